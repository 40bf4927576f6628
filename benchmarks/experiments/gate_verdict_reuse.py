"""Seconds of a hospital source's export gate on its ipc-10 sets, gated (no sealed verdict yet) and reused (the
centre's sealed record of the same set, reference and code: ``privacy_reports.sent_set_report``, issue 23).

For one source of ``centre-node make-pcam-centres --hospitals``: makes (or reads from the work dir's cache) the
per-slide and patch-level sets as a federation source does, then calls ``sent_set_report`` on each, one torch
thread. Run it twice with the same ``--work``: the first run gates and records, the second (a fresh process, as the
next study is) reuses. One JSON line per set; the second run also checks that the verdict and report are the ones
recorded.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/experiments/gate_verdict_reuse.py CENTRES H1 --seed 0 --work WORK \\
        --out benchmarks/results/gate_verdict_reuse.jsonl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("centres", type=Path)
    ap.add_argument("centre", help="e.g. H1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, required=True, help="the source's work dir root (keys/ and work/ below)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="pcam-c17-hospitals-fixed")
    a = ap.parse_args()

    from histodd_fed.federation import centre_data, distil_cache, gate_verdicts, privacy_reports
    from histodd_fed.federation.centre_config import CentreConfig
    from histodd_fed.federation.presets import get_preset

    preset = get_preset(a.preset)
    cfg = CentreConfig.from_node_config({"centre-id": a.centre, "data": str(a.centres / a.centre / "source"),
                                         "key-dir": str(a.work / "keys"), "work-dir": str(a.work / "work"),
                                         "preset": a.preset, "seed": a.seed})
    cfg.key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    prepared = centre_data.prepare(cfg, preset, models=False)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    for per_slide in (True, False):
        res = distil_cache.distil_cached(cfg, preset, prepared, ipc=10, seed=a.seed, per_slide=per_slide)
        key = gate_verdicts.verdict_key(res.patchset, prepared.gate_reference())
        record = cfg.work_dir / gate_verdicts.RECORDS_DIR / f"{key[:32]}.json"
        before = json.loads(record.read_text()) if record.is_file() else None
        t0 = time.perf_counter()
        blocked, report, _ = privacy_reports.sent_set_report(res.patchset, prepared, cfg)
        seconds = round(time.perf_counter() - t0, 2)
        row = {"centre": a.centre, "seed": a.seed, "set": "per-slide" if per_slide else "patch",
               "images": len(res.patchset), "reference": len(prepared.gate_reference()),
               "call": "reused" if before is not None else "gated", "blocked": blocked, "seconds": seconds,
               "same_as_recorded": None if before is None else (before["blocked"], before["report"]) == (blocked, report),
               "commit": commit}
        print(json.dumps(row), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
