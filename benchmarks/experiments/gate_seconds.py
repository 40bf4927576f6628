"""Seconds of the export gate a hospital source runs on its ipc-10 sets (issue 23, time per seed).

For one source of ``centre-node make-pcam-centres --hospitals`` (its ``source`` folder), makes (or reads from the
work dir's cache) the patch-level and per-slide sets exactly as a federation source does
(``outgoing_sets.make_part``'s ``distil_cached``) and times ``privacy_reports.gate_report`` on each, one torch
thread, as the source runs it: the first call in a fresh process (the real side of the memorisation audit computed),
then the same set again (the real side reused, as for a set whose candidate check ran first). One JSON line each.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/experiments/gate_seconds.py CENTRES H1 --seed 0 --work WORK \\
        --out benchmarks/results/gate_seconds.jsonl
"""

from __future__ import annotations

import argparse
import json
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

    import subprocess

    from histodd_fed.federation import centre_data, distil_cache, privacy_reports
    from histodd_fed.federation.centre_config import CentreConfig
    from histodd_fed.federation.presets import get_preset

    preset = get_preset(a.preset)
    cfg = CentreConfig.from_node_config({"centre-id": a.centre, "data": str(a.centres / a.centre / "source"),
                                         "key-dir": str(a.work / "keys"), "work-dir": str(a.work / "work"),
                                         "preset": a.preset, "seed": a.seed})
    prepared = centre_data.prepare(cfg, preset, models=False)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    for per_slide, calls in ((True, ("first",)), (False, ("first", "again"))):
        res = distil_cache.distil_cached(cfg, preset, prepared, ipc=10, seed=a.seed, per_slide=per_slide)
        for call in calls:
            if call == "first":
                from histodd_fed.privacy import memorisation

                getattr(memorisation, "_REAL_SIDES", {}).clear()   # absent before the memo (older commits)
            t0 = time.perf_counter()
            blocked, _, _ = privacy_reports.gate_report(res.patchset, prepared)
            row = {"centre": a.centre, "seed": a.seed, "set": "per-slide" if per_slide else "patch",
                   "images": len(res.patchset), "image_size": res.patchset.image_size, "reference": len(prepared.train),
                   "call": call, "blocked": blocked, "seconds": round(time.perf_counter() - t0, 1),
                   "set_cached": res.cached, "commit": commit}
            print(json.dumps(row), flush=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
