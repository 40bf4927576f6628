"""Which DM initialisation leaves sets the copy detector passes, and at what accuracy? (tuning split of PCam train)

Distils one set per variant (the pcam preset's recipe, one candidate, overrides per variant) from PCam
`train` minus 1,000 patches per class, runs the copy detector against the distil-from raw patches (both
views) and evaluates the set on the held-back 1,000 / class with the preset's evaluation recipe.

    .venv/bin/python benchmarks/experiments/screen_recipe_copies.py --variants "mix2:init_mix=2" "mix8:init_mix=8,init_colour_pool=32" \
        --seed 0 --out benchmarks/results/recipe_copies.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from histodd_fed.distill import run_distillation
from histodd_fed.patchset import load_image_folder
from histodd_fed.preprocess import apply_view, audit_views
from histodd_fed.preset import load_preset
from histodd_fed.privacy.copies import detect_copies
from histodd_fed.training.evaluation import evaluate_sets

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "pcam-ai4all"


def parse(v: str) -> tuple[str, dict]:
    name, _, kv = v.partition(":")
    out = {}
    for item in filter(None, kv.split(",")):
        k, _, x = item.partition("=")
        try:
            out[k] = json.loads(x)
        except json.JSONDecodeError:
            out[k] = x
    return name, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seeds", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    train = load_image_folder(DATA / "train")
    rng = np.random.default_rng(1234)
    test_idx = np.concatenate([rng.choice(np.flatnonzero(train.labels == c), 1000, replace=False) for c in (0, 1)])
    mask = np.ones(len(train), bool)
    mask[test_idx] = False
    source, test = train.subset(np.flatnonzero(mask)), train.subset(test_idx)
    pre = load_preset("pcam")
    src_v, test_v = apply_view(source, pre.view), apply_view(test, pre.view)
    ev = pre.eval
    for v in a.variants:
        name, over = parse(v)
        cfg = pre.distill_config(candidates=1, seed=a.seed, **over)
        t = time.perf_counter()
        syn = run_distillation(src_v, cfg, progress=False).patchset
        dist_s = time.perf_counter() - t
        t = time.perf_counter()
        rep = detect_copies(syn.images, source.images, audit_views(pre.view, 96, syn.image_size))
        det_s = time.perf_counter() - t
        res = evaluate_sets({name: syn}, test_v, ev.arch, seeds=a.eval_seeds, epochs=ev.epochs, lr=ev.lr,
                            batch_size=ev.batch_size, augmentation=ev.augmentation, arch_kwargs=dict(ev.arch_kwargs),
                            progress=False)[name]
        row = {"variant": name, "overrides": over, "seed": a.seed, "accuracy": round(float(res.summary()["accuracy_mean"]), 4),
               "flagged": len(rep.flagged), "n": len(syn), "threshold": rep.threshold,
               "r2": sorted(round(f.r2, 3) for f in rep.findings), "distil_s": round(dist_s, 1),
               "detect_s": round(det_s, 1)}
        print(json.dumps(row), flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with a.out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
