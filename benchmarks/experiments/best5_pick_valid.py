"""What best of 5 would have kept, in the same run as a best-of-10 one (reporting only, nothing is chosen here).

For every seed of a ``bench_preset_seeds.py`` record (``--records``) whose best-of-10 choice is a candidate
past the fifth, the candidate best of 5 would have kept (highest held-out accuracy among the first five;
the first of equals) is rebuilt from the run's own checkpoints (``WORK/sS.work``; a missing checkpoint is
recomputed, deterministically) and evaluated on PCam ``valid`` with the preset's evaluation (3 seeds). For
the other seeds both choices are the same set. Prints one JSON line per seed with both accuracies.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/experiments/best5_pick_valid.py \\
        --records benchmarks/results/preset_seeds_best10.jsonl --work ../runs/preset_seeds_best10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "pcam-ai4all"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="bench_preset_seeds.py's --work")
    args = ap.parse_args()

    from histodd_fed.distill import run_distillation
    from histodd_fed.distill.select import candidate_config, holdout_split
    from histodd_fed.patchset import load_image_folder
    from histodd_fed.preprocess import apply_view
    from histodd_fed.preset import load_preset
    from histodd_fed.training.evaluation import evaluate_sets

    preset = load_preset("pcam")
    rows = [json.loads(line) for line in args.records.read_text().splitlines() if line.strip()]
    real = valid = None
    for r in sorted(rows, key=lambda r: r["seed"]):
        cands = r["selection"]["candidates"]
        first5 = [c["heldout_accuracy"] for c in cands[:5]]
        k5 = int(np.argmax(first5))
        out = {"seed": r["seed"], "best10_chosen": r["selection"]["chosen"], "best5_pick": k5,
               "best10_valid": round(r["eval"]["accuracy_mean"], 4)}
        if k5 == r["selection"]["chosen"]:           # the same set either way
            out["best5_valid"] = out["best10_valid"]
            print(json.dumps(out), flush=True)
            continue
        if cands[k5].get("gate_passed") is False:   # best of 5 would have moved on to another: not rebuilt here
            print(json.dumps({**out, "best5_valid": None}), flush=True)
            continue
        if real is None:
            real = apply_view(load_image_folder(DATA / "train"), preset.view)
            valid = apply_view(load_image_folder(DATA / "valid"), preset.view)
        config = preset.distill_config(ipc=r["ipc"], seed=r["seed"])
        keep, _ = holdout_split(real, config.candidate_holdout, config.seed)
        res = run_distillation(real.subset(keep), candidate_config(config, k5), args.work / f"s{r['seed']}.work",
                               progress=False)
        e = preset.eval
        ev = evaluate_sets({"c": res.patchset}, valid, e.arch, seeds=3, epochs=e.epochs, lr=e.lr,
                           batch_size=e.batch_size, augmentation=e.augmentation, arch_kwargs=dict(e.arch_kwargs),
                           progress=False)["c"]
        out["best5_valid"] = round(float(ev.summary()["accuracy_mean"]), 4)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
