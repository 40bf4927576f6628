"""histodd_fed.allocator: freed tensor memory is reused (no page faults per training step), numbers unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from histodd_fed.allocator import SETTINGS, _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="glibc malloc only (mallopt)")

# 20 ConvNet-3 training steps; prints minor page faults per step and a hash of the trained weights
PROBE = textwrap.dedent("""
    import hashlib, json, os, resource, sys
    import torch
    from torch.nn import functional as F
    if sys.argv[1] == "1":
        from histodd_fed.allocator import keep_freed_memory
        applied = keep_freed_memory()
    else:
        applied = {}
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from histodd_fed.models.convnet import convnet
    m = convnet(num_classes=2, image_size=32, width=32, depth=3)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(64, 3, 32, 32), torch.randint(0, 2, (64,))
    def step():
        loss = F.cross_entropy(m(x), y); opt.zero_grad(); loss.backward(); opt.step()
    for _ in range(5):
        step()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 20
    weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in m.parameters())).hexdigest()
    child = {k: os.environ.get(k) for k in %r}
    print(json.dumps({"faults": faults, "weights": weights, "applied": applied, "child_env": child}))
""" % (sorted(SETTINGS),))


def _probe(tune: bool, env_extra: dict[str, str] | None = None) -> dict:
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if tune else "0"], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_training_steps_stop_page_faulting_and_train_the_same_weights():
    plain, tuned = _probe(False), _probe(True)
    # glibc's defaults hand the step's buffers back to the kernel: thousands of fresh pages every step
    assert plain["faults"] > 500, plain
    assert tuned["faults"] < plain["faults"] / 10, (plain["faults"], tuned["faults"])
    assert tuned["weights"] == plain["weights"]  # arithmetic untouched
    assert set(tuned["applied"]) == set(SETTINGS)
    # exported for processes started later (spawned workers, Flower's simulation)
    assert tuned["child_env"] == {k: str(v) for k, (_, v) in SETTINGS.items()}


def test_a_users_own_setting_is_kept():
    mine = {"MALLOC_TOP_PAD_": "1048576"}
    res = _probe(True, mine)
    assert res["child_env"]["MALLOC_TOP_PAD_"] == "1048576"
    assert res["applied"]["MALLOC_TOP_PAD_"] == 1048576


def test_histodd_malloc_default_leaves_glibc_alone():
    res = _probe(True, {"HISTODD_MALLOC": "default"})
    assert res["applied"] == {}
    assert all(v is None for v in res["child_env"].values())
    assert res["faults"] > 500  # the per-step page faults are back
