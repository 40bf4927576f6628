"""The export gate on a hospital source's per-slide synthetic sets, seed by seed (issue 23, slide level).

For one source of ``centre-node make-pcam-centres --hospitals`` (its ``source`` folder), makes the per-slide
set exactly as a federation source does (``distil_cached(per_slide=True)``, the benchmark preset) for each
seed and runs the export gate (``privacy_reports.gate_report``) on it; one JSON line per seed: verdict, the
first reason, how many (slide, class) groups were topped up (``slide_group_min``) and the seconds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/experiments/slide_sets_gate.py CENTRES H1 --seeds 0-4 \\
        --work WORK --out benchmarks/results/slide_sets_gate.jsonl [--set slide_group_min=0]
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
    ap.add_argument("--seeds", default="0-4")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="pcam-c17-hospitals-fixed")
    ap.add_argument("--set", action="append", default=[], help="distill override key=value (int)")
    a = ap.parse_args()

    from histodd_fed.federation import centre_data, distil_cache, privacy_reports
    from histodd_fed.federation.centre_config import CentreConfig
    from histodd_fed.federation.presets import get_preset

    lo, _, hi = a.seeds.partition("-")
    seeds = range(int(lo), int(hi or lo) + 1)
    overrides = {k: int(v) for k, v in (s.split("=", 1) for s in a.set)}
    preset = get_preset(a.preset)
    for seed in seeds:
        cfg = CentreConfig.from_node_config({"centre-id": a.centre, "data": str(a.centres / a.centre / "source"),
                                             "key-dir": str(a.work / "keys"), "work-dir": str(a.work / a.centre),
                                             "preset": a.preset, "seed": seed})
        prepared = centre_data.prepare(cfg, preset, models=False)
        t0 = time.perf_counter()
        res = distil_cache.distil_cached(cfg, preset, prepared, ipc=10, seed=seed, per_slide=True,
                                         extra_overrides=overrides or None)
        blocked, _, message = privacy_reports.gate_report(res.patchset, prepared)
        widened = res.patchset.meta.get("slide_groups_widened")
        row = {"centre": a.centre, "seed": seed, "overrides": overrides, "blocked": blocked,
               "reason": message.split(";")[0][:200] if blocked else "",
               "images": len(res.patchset), "groups_topped_up": None if widened is None else len(widened),
               "seconds": round(time.perf_counter() - t0, 1), "cached": res.cached}
        print(json.dumps(row), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
