"""Drift from the start vs steps: one distillation with a drift record at every outer step (or every
``--every``), on PCam patches; writes the set's ``meta["drift"]``, the local to-real summary (mixtures),
the loss curve and timings as JSON, and a power-law fit of the mean RMS change against image steps
(outer x inner steps) with its extrapolation to ``--extrapolate`` image steps.

    # gradient matching, the paper preset at 32 px, the paper's U = 100, 3 outer steps
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_drift.py --config configs/distill-paper.yaml \
        --set '{"image_size": 32, "outer_steps": 3, "inner_steps": 100}' --per-class 100 \
        --extrapolate 20000 --out benchmarks/results/drift_gm_paper32.json
    # or read the records of a set `centre-node distill` wrote
    .venv/bin/python benchmarks/bench_drift.py --from-set S --extrapolate 400 --out J
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def fit_power(steps: list[float], values: list[float]) -> dict | None:
    """log(value) = log(a) + b log(step) by least squares over the records with step > 0 and value > 0."""
    pts = [(s, v) for s, v in zip(steps, values) if s > 0 and v and v > 0]
    if len(pts) < 2:
        return None
    x = np.log([p[0] for p in pts])
    y = np.log([p[1] for p in pts])
    b, loga = np.polyfit(x, y, 1)
    return {"a": float(math.exp(loga)), "b": float(b), "points": len(pts)}


def summarise(drift: dict, inner: int, extrapolate: int | None, local: dict | None = None) -> dict:
    image_steps = [s * inner for s in drift["steps"]]
    out = {"drift": drift, "image_steps": image_steps, "inner_steps": inner}
    if local and isinstance(local.get("to_real_summary"), dict):
        out["to_real_summary"] = local["to_real_summary"]
    fit = fit_power(image_steps, drift["rms_mean"])
    if fit:
        out["rms_fit"] = fit
        if extrapolate:
            out["rms_extrapolated"] = {"image_steps": extrapolate,
                                       "rms_mean": fit["a"] * extrapolate ** fit["b"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", default=str(REPO.parent / "shared/data/pcam-ai4all/train"))
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--config", default=str(REPO / "configs/distill-paper.yaml"))
    ap.add_argument("--set", default="{}", help="JSON of DistillConfig overrides")
    ap.add_argument("--every", type=int, default=1, help="outer steps between drift records (checkpoint_every)")
    ap.add_argument("--from-set", default=None, help="read a written set's meta instead of distilling")
    ap.add_argument("--extrapolate", type=int, default=None, help="image steps to extrapolate the RMS fit to")
    ap.add_argument("--work", default="/tmp/bench_drift.work")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.from_set:
        from histodd_fed.patchset import PatchSet

        ps = PatchSet.load(a.from_set)
        local_file = Path(a.from_set) / "drift.json"
        local = json.loads(local_file.read_text()) if local_file.is_file() else None
        cfg = ps.meta["config"]
        rec = {"source": a.from_set, "method": ps.meta.get("method"), "config": cfg,
               "timings": ps.meta.get("timings"),
               **summarise(ps.meta["drift"], int(cfg["inner_steps"]), a.extrapolate, local)}
    else:
        from histodd_fed.distill import DistillConfig, run_distillation
        from histodd_fed.training.data import load_patches

        real = load_patches(a.patches, limit=a.per_class, seed=0)
        cfg = DistillConfig.from_yaml(a.config, **{"checkpoint_every": a.every, "device": "cpu", **json.loads(a.set)})
        t0 = time.perf_counter()
        res = run_distillation(real, cfg, Path(a.work), progress=False)
        meta = res.patchset.meta
        rec = {"patches": a.patches, "per_class": a.per_class, "config_file": a.config, "overrides": json.loads(a.set),
               "method": meta["method"], "lr_img_effective": meta.get("lr_img_effective"),
               "seconds": round(time.perf_counter() - t0, 1), "timings": meta["timings"],
               "loss_curve": meta["loss_curve"],
               **summarise(meta["drift"], cfg.inner_steps, a.extrapolate, res.drift_local)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1))
    d = rec["drift"]
    for i, s in enumerate(d["steps"]):
        print(f"outer {s:5d} (image steps {rec['image_steps'][i]:6d}): RMS {d['rms_mean'][i]:.4f}  "
              f"|d| {d['abs_mean_mean'][i]:.4f}  SSIM {d['ssim_mean'][i]:.3f}  structure {d['structure_mean'][i]:.3f}")
    if "rms_fit" in rec:
        print("RMS fit:", rec["rms_fit"], rec.get("rms_extrapolated"))


if __name__ == "__main__":
    main()
