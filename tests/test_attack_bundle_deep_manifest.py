"""Issue 24 item 6 (manifests): a trusted sender nests its manifest 600 deep.

The manifest authenticates (the sender signed it), then every recursive walk of it - the config
hash, the receipt and patch-set writers - exceeds Python's recursion limit: a raw ``RecursionError``
and a traceback in ``centre-node open`` (in a Flower train reply it would fail the whole reply).
Every parsed structure of a bundle is bounded in depth and size: a typed :class:`SemanticError`,
one line, nothing written, no ledger entry.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from centre_node.cli import app
from histodd_fed.bundle import (FormatError, Ledger, SemanticError, TrustStore, generate_identity, open_bundle,
                                seal)
from histodd_fed.bundle.hostile import forge_bundle
from histodd_fed.patchset import PatchSet

runner = CliRunner()


def _nest(depth: int, leaf=0, kind: str = "dict"):
    v = leaf
    for _ in range(depth):
        v = {"a": v} if kind == "dict" else [v]
    return v


def _ps(meta=None) -> PatchSet:
    rng = np.random.default_rng(0)
    return PatchSet(images=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), labels=np.array([0, 1, 0, 1]),
                    class_names=["normal", "tumour"], kind="synthetic", meta=meta or {"seed": 0})


@pytest.fixture()
def world(tmp_path):
    c1, c2 = generate_identity("C1", tmp_path / "C1"), generate_identity("C2", tmp_path / "C2")
    store = TrustStore.load(tmp_path / "C2")
    store.add(c1.public)
    store.save()
    return tmp_path, c1, c2


@pytest.mark.parametrize("where", ["extra", "distillation_config", "privacy_report_list"])
def test_attack_manifest_nested_600_deep(world, where):
    tmp_path, c1, c2 = world
    deep = {"extra": {"extra": {"x": _nest(600)}},
            "distillation_config": {"distillation_config": {"seed": 0, "deep": _nest(600)}},
            "privacy_report_list": {"privacy_report": {"report": _nest(600, kind="list")}}}[where]
    blob = forge_bundle(_ps(), c1, [c2.public], manifest_fields=deep)
    bundle = tmp_path / "deep.hdb"
    bundle.write_bytes(blob)
    r = runner.invoke(app, ["open", str(bundle), "--keys", str(tmp_path / "C2"), "--out", str(tmp_path / "o")])
    assert isinstance(r.exception, SemanticError), repr(r.exception)
    msg = str(r.exception)
    assert "\n" not in msg and "deep.hdb" in msg and "nested deeper than" in msg, msg
    assert not (tmp_path / "o").exists()
    assert Ledger.in_key_dir(tmp_path / "C2").entries() == {}


def test_depth_limit_is_exact_and_sealing_refuses_it_too(world):
    from histodd_fed.bundle.bounded_json import MAX_DEPTH

    tmp_path, c1, c2 = world
    ok_meta = {"seed": 0, "deep": _nest(MAX_DEPTH - 2)}  # manifest (1) > distillation_config (2) > deep
    opened = open_bundle(seal(_ps(ok_meta), c1, [c2.public]), c2, TrustStore.load(tmp_path / "C2"),
                         Ledger(tmp_path / "l.json"))
    assert opened.manifest["distillation_config"]["deep"] == ok_meta["deep"]
    with pytest.raises(SemanticError, match="nested deeper than"):
        open_bundle(forge_bundle(_ps(), c1, [c2.public], extra={"deep": _nest(MAX_DEPTH - 1)}), c2,
                    TrustStore.load(tmp_path / "C2"), Ledger(tmp_path / "l.json"))
    with pytest.raises(FormatError, match="nested deeper than"):
        seal(_ps({"seed": 0, "deep": _nest(600)}), c1, [c2.public])


def test_bounded_json_rules():
    from histodd_fed.bundle.bounded_json import loads_bounded

    assert loads_bounded(b'{"a":[1,{"b":2}]}', "x", SemanticError) == {"a": [1, {"b": 2}]}
    for raw, what in ((b'{"a":' * 10_000 + b"0" + b"}" * 10_000, "nested deeper than"),
                      (b'{"a":1,"a":2}', "duplicate key"),
                      (b"[" * 100_000, "nested deeper than"),
                      (b'{"a":NaN}', "not valid JSON"),
                      (b"\xff", "not valid JSON"),
                      (json.dumps(list(range(200))).encode(), "more than 100 values")):
        with pytest.raises(SemanticError, match=what) as ei:
            loads_bounded(raw, "thing", SemanticError, max_nodes=100)
        assert "\n" not in str(ei.value) and str(ei.value).startswith("thing: ")
