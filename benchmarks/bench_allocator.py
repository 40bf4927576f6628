"""glibc malloc defaults vs :mod:`histodd_fed.allocator`'s settings, side by side in one run (CPU).

Two workloads, each run in a fresh process per setting (``HISTODD_MALLOC=default`` for glibc's defaults),
the settings alternated ``--repeat`` times so the machine's drift hits both alike:

1. ``fine-tune``: 300 steps of the hospital benchmark's fine-tune (ConvNet-3 w32, 32 px, batch 32,
   flip_rotate augmentation, SGD), one torch thread;
2. ``distill``: one ``--preset pcam --ipc 10`` distillation candidate through the CLI
   (``centre-node distill --candidates 1 --no-gate --workers 1``) on ``--patches`` (skipped without it).

Per run: wall, user and system seconds, peak resident memory, minor page faults; per workload the medians
and the ratio default / tuned. ``--json`` writes every run and the summary.

    .venv/bin/python benchmarks/bench_allocator.py [--patches CENTRES/H1/source/train] [--repeat 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FINE_TUNE = """
import sys, torch
from torch.nn import functional as F
from histodd_fed.allocator import keep_freed_memory
keep_freed_memory()   # as every CLI does (a no-op under HISTODD_MALLOC=default)
torch.set_num_threads(1)
torch.manual_seed(0)
from histodd_fed.augment import build_augmentation
from histodd_fed.models.convnet import convnet
m = convnet(num_classes=2, image_size=32, width=32, depth=3)
aug = build_augmentation("flip_rotate")
x_all = torch.randint(0, 255, (2000, 3, 32, 32), dtype=torch.uint8)
y_all = torch.randint(0, 2, (2000,))
opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
g = torch.Generator().manual_seed(1)
for _ in range(300):
    idx = torch.randint(0, 2000, (32,), generator=g)
    x = aug(x_all[idx].float().div_(255), g)
    loss = F.cross_entropy(m(x), y_all[idx])
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
print(float(loss))
"""


def _run(cmd: list[str], setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(OMP_NUM_THREADS="1", HISTODD_NO_PROGRESS="1")
    if setting == "default":
        env["HISTODD_MALLOC"] = "default"
    else:
        env.pop("HISTODD_MALLOC", None)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True, cwd=REPO)
        _, status, use = os.wait4(proc.pid, 0)   # this child's own rusage (peak memory included)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({setting}): {stderr.strip()[-500:]}")
    return {"setting": setting, "wall_s": round(wall, 2), "user_s": round(use.ru_utime, 2),
            "sys_s": round(use.ru_stime, 2), "minor_faults": use.ru_minflt, "peak_rss_mb": round(use.ru_maxrss / 1024, 1),
            "stdout_last": stdout.strip().splitlines()[-1][:200] if stdout.strip() else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=Path, help="a patch store for the distill workload (e.g. CENTRES/H1/source/train)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    py = sys.executable
    workloads = {"fine-tune": lambda tmp: [py, "-c", FINE_TUNE]}
    if a.patches:
        cli = str(Path(py).with_name("centre-node"))
        workloads["distill"] = lambda tmp: [cli, "distill", "--patches", str(a.patches), "--preset", "pcam",
                                            "--ipc", "10", "--candidates", "1", "--no-gate", "--workers", "1",
                                            "--seed", "0", "--out", str(tmp / "set"), "--work-dir", str(tmp / "work")]
    runs = []
    for name, cmd in workloads.items():
        for r in range(a.repeat):
            for setting in (("default", "tuned") if r % 2 == 0 else ("tuned", "default")):
                tmp = Path(tempfile.mkdtemp(prefix="bench-alloc-"))
                try:
                    row = {"workload": name, "repeat": r, **_run(cmd(tmp), setting)}
                    # what the run computed: the final loss (fine-tune), the set's image bytes (distill)
                    images = tmp / "set" / "images.npy"
                    row["result"] = (hashlib.sha256(images.read_bytes()).hexdigest()[:16] if images.exists()
                                     else row["stdout_last"])
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                runs.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    print(f"\n{'workload':10} {'setting':8} {'wall s':>7} {'user s':>7} {'sys s':>6} {'faults':>10} {'peak MB':>8}   result")
    for name in workloads:
        per = {}
        for setting in ("default", "tuned"):
            rows = [r for r in runs if r["workload"] == name and r["setting"] == setting]
            per[setting] = {k: statistics.median(r[k] for r in rows) for k in ("wall_s", "user_s", "sys_s", "minor_faults", "peak_rss_mb")}
            per[setting]["results"] = sorted({r["result"] for r in rows})
            print(f"{name:10} {setting:8} {per[setting]['wall_s']:7.1f} {per[setting]['user_s']:7.1f} "
                  f"{per[setting]['sys_s']:6.1f} {per[setting]['minor_faults']:10.0f} {per[setting]['peak_rss_mb']:8.0f}   "
                  f"{per[setting]['results']}")
        per["wall_ratio_default_over_tuned"] = round(per["default"]["wall_s"] / per["tuned"]["wall_s"], 3)
        per["same_result"] = per["default"]["results"] == per["tuned"]["results"]
        print(f"{name:10} wall default / tuned = {per['wall_ratio_default_over_tuned']:.2f}; same result: {per['same_result']}")
        summary[name] = per
    if a.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=REPO).stdout.strip()
        a.json.write_text(json.dumps({"commit": commit, "runs": runs, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
