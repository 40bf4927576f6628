"""How much slide AUC a patch classifier of a given patch AUC can give on the pseudo-slides (issue 23, slide level).

The real-tissue slide columns sit near chance for every row, Full's included. This asks whether that is the MIL
head's fault or the slides': a simulated ceiling under deliberately generous assumptions. Each patch gets an
independent score, normal ~ N(0, 1), tumour ~ N(d, 1), with d set so the patch AUC is the one measured
(d = sqrt(2) * Phi^-1(AUC)); a slide is a bag of ``--bag`` patches, a tumour slide holding k ~ U{kmin..kmax} tumour
patches (make-pcam-centres' test slides: 64 patches, 2-6 tumour, 3.1-9.4%), a normal slide none. Slide scores:
the bag mean, the bag max and the likelihood ratio with d known (the optimal statistic under this model - no
trained MIL head on these bags can beat it when the model holds). It leaves out what a real head also faces: errors
correlated within a slide, an unknown d, 20 training bags.

With ``--summary R/summary.csv`` (a ``coordinator transfer`` run) the ceiling is computed at each target's
measured patch AUC of "target alone" and "+ Full", so Full's best-case slide gain is set beside the measured one.
One JSON object per line to ``--out``.

    .venv/bin/python benchmarks/experiments/slide_auc_ceiling.py \\
        --summary benchmarks/results/pcam_hospitals/leave_one_out/summary.csv \\
        --out benchmarks/results/pcam_hospitals/slide_auc_ceiling.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
from scipy.stats import norm, rankdata


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count half)."""
    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def slide_ceiling(patch_auc: float, bag: int, kmin: int, kmax: int, slides: int, test_slides: int,
                  rng: np.random.Generator) -> dict[str, float]:
    d = math.sqrt(2) * norm.ppf(patch_auc)
    neg = rng.normal(0.0, 1.0, (slides, bag))
    pos = rng.normal(0.0, 1.0, (slides, bag))
    k = rng.integers(kmin, kmax + 1, slides)
    pos[np.arange(bag)[None, :] < k[:, None]] += d
    stats = {"mean": lambda x: x.mean(1), "max": lambda x: x.max(1),
             "likelihood_ratio": lambda x: np.log(np.exp(d * x - d * d / 2).mean(1))}
    out: dict[str, float] = {"patch_auc": patch_auc, "d": round(d, 4)}
    for name, f in stats.items():
        sp, sn = f(pos), f(neg)
        out[f"slide_auc_{name}"] = round(_auc(sp, sn), 4)
        # spread of the AUC a test set of `test_slides` per class would show for this same scorer
        per = [_auc(sp[i:i + test_slides], sn[i:i + test_slides]) for i in range(0, slides - test_slides + 1, test_slides)]
        out[f"slide_auc_{name}_sd_at_{test_slides}_per_class"] = round(float(np.std(per, ddof=1)), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patch-auc", type=float, nargs="*", default=[0.65, 0.70, 0.75, 0.80, 0.90, 0.95])
    ap.add_argument("--summary", type=Path, help="a run's summary.csv: the ceiling at its alone / Full patch AUCs")
    ap.add_argument("--bag", type=int, default=64)
    ap.add_argument("--k", default="2-6", help="tumour patches per tumour slide, LOW-HIGH")
    ap.add_argument("--slides", type=int, default=20000, help="simulated slides per class")
    ap.add_argument("--test-slides", type=int, default=20, help="slides per class of one test set (for its AUC's SD)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    kmin, kmax = (int(x) for x in a.k.split("-"))
    rng = np.random.default_rng(a.seed)
    lines = []
    for auc in a.patch_auc:
        lines.append({"kind": "grid", **slide_ceiling(auc, a.bag, kmin, kmax, a.slides, a.test_slides, rng)})
    if a.summary:
        for r in csv.DictReader(a.summary.open()):
            if r["transfer"] in ("target alone", "+ Full") and r.get("patch_auc_mean"):
                c = slide_ceiling(float(r["patch_auc_mean"]), a.bag, kmin, kmax, a.slides, a.test_slides, rng)
                lines.append({"kind": "measured", "target": r["target"], "transfer": r["transfer"],
                              "measured_slide_auc": float(r["slide_auc_mean"]) if r.get("slide_auc_mean") else None, **c})
    config = {"bag": a.bag, "k": [kmin, kmax], "slides_per_class": a.slides, "test_slides_per_class": a.test_slides,
              "seed": a.seed, "summary": str(a.summary) if a.summary else None}
    for ln in lines:
        ln["config"] = config
        print(json.dumps({k: v for k, v in ln.items() if k != "config"}))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.out.with_suffix(a.out.suffix + ".tmp")
        tmp.write_text("".join(json.dumps(ln) + "\n" for ln in lines))
        tmp.replace(a.out)


if __name__ == "__main__":
    main()
