"""Seconds of the export gate a hospital source runs on its ipc-10 sets (issue 23, time per seed).

For one source of ``centre-node make-pcam-centres --hospitals`` (its ``source`` folder), makes (or reads from the
work dir's cache) the patch-level and per-slide sets exactly as a federation source does
(``outgoing_sets.make_part``'s ``distil_cached``) and times the gate on each, one torch thread, one JSON line each:

- default: ``privacy_reports.gate_report`` as the source runs it: the first call in a fresh process (the real side
  of the memorisation audit computed), then the same set again (the real side reused, as for a set whose candidate
  check ran first);
- ``--sealed``: ``privacy_reports.sent_set_report``, the source's gate with its sealed verdicts
  (``gate_verdicts``). Run it twice with the same ``--work``: the first run gates and records ("gated"), the second,
  a fresh process as the next study is, reuses ("reused") and checks the verdict and report are the ones recorded.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/experiments/gate_seconds.py CENTRES H1 --seed 0 --work WORK \\
        --out benchmarks/results/gate_seconds.jsonl
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/experiments/gate_seconds.py CENTRES H1 --seed 0 --work WORK \\
        --sealed --out benchmarks/results/gate_verdict_reuse.jsonl        # twice
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any


def _gate_report(cfg, prepared, ps, calls: tuple[str, ...]) -> list[tuple[str, bool, float, dict[str, Any]]]:
    from histodd_fed.federation import privacy_reports
    from histodd_fed.privacy import memorisation

    rows = []
    for call in calls:
        if call == "first":
            getattr(memorisation, "_REAL_SIDES", {}).clear()   # absent before the memo (older commits)
        t0 = time.perf_counter()
        blocked, _, _ = privacy_reports.gate_report(ps, prepared)
        rows.append((call, blocked, time.perf_counter() - t0, {}))
    return rows


def _sealed(cfg, prepared, ps, calls: tuple[str, ...] = ()) -> list[tuple[str, bool, float, dict[str, Any]]]:
    from histodd_fed.federation import gate_verdicts, privacy_reports

    key = gate_verdicts.verdict_key(ps, prepared.gate_reference())
    record = cfg.work_dir / gate_verdicts.RECORDS_DIR / f"{key[:32]}.json"
    before = json.loads(record.read_text()) if record.is_file() else None
    t0 = time.perf_counter()
    blocked, report, _ = privacy_reports.sent_set_report(ps, prepared, cfg)
    seconds = time.perf_counter() - t0
    same = None if before is None else (before["blocked"], before["report"]) == (blocked, report)
    return [("gated" if before is None else "reused", blocked, seconds, {"same_as_recorded": same})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("centres", type=Path)
    ap.add_argument("centre", help="e.g. H1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, required=True, help="the source's work dir root (keys/ and work/ below)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="pcam-c17-hospitals-fixed")
    ap.add_argument("--sealed", action="store_true", help="time the source's gate with its sealed verdicts")
    a = ap.parse_args()

    from histodd_fed.federation import centre_data, distil_cache
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
        timed = (_sealed if a.sealed else _gate_report)(cfg, prepared, res.patchset,
                                                        ("first",) if per_slide else ("first", "again"))
        for call, blocked, seconds, extra in timed:
            row = {"centre": a.centre, "seed": a.seed, "set": "per-slide" if per_slide else "patch",
                   "images": len(res.patchset), "image_size": res.patchset.image_size, "reference": len(prepared.train),
                   "call": call, "blocked": blocked, "seconds": round(seconds, 2 if a.sealed else 1),
                   "set_cached": res.cached, **extra, "commit": commit}
            print(json.dumps(row), flush=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
