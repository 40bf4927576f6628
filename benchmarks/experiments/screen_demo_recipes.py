"""Screen distillation recipes for the demo: privacy-gate verdict and a utility proxy, per recipe.

For a finished demo output folder (``coordinator demo --out DIR``): distil C1's prepared train
patches with each named variant (overrides of ``configs/distill-cpu.yaml`` on top of the cpu
preset's demo overrides), run the export gate against those patches, train a fresh ConvNet w32 on
the 20 images (150 epochs, DSA, 2 seeds) and report balanced accuracy / AUC on C2's prepared test
patches. It reads the demo's test split, so use it to screen candidates only and confirm on fresh
demo seeds (docs/notes/2026-11-demo-first-design.md "Demo recipe A/B").

    .venv/bin/python benchmarks/experiments/screen_demo_recipes.py DEMO_DIR [variant,variant,...]
"""
import glob
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from histodd_fed.distill import DistillConfig, run_distillation  # noqa: E402
from histodd_fed.patchset import PatchSet  # noqa: E402
from histodd_fed.privacy.gate import check_export  # noqa: E402
from histodd_fed.training.evaluation import evaluate_sets  # noqa: E402

BASE = dict(init="real", lr_img=1.0, distance="l1", outer_steps=30, inner_steps=5, checkpoint_every=0, ipc=10)
VARIANTS = {
    "current": {},
    "cos_lr0.1": dict(distance="cosine", lr_img=0.1),
    "cos_lr1": dict(distance="cosine", lr_img=1.0),
    "l1mean_lr1": dict(distance="l1_mean", lr_img=1.0),
    "l1mean_lr10": dict(distance="l1_mean", lr_img=10.0),
    "noise_cos_lr1": dict(distance="cosine", lr_img=1.0, init="noise"),
    "nocolor_cos_lr1": dict(distance="cosine", lr_img=1.0, augmentation="crop_cutout_flip_scale_rotate"),
    "cos_lr0.3": dict(distance="cosine", lr_img=0.3),
    "noise_cos_lr0.3": dict(distance="cosine", lr_img=0.3, init="noise"),
    "noise_cos_lr1_60": dict(distance="cosine", lr_img=1.0, init="noise", outer_steps=60),
    "noise_cos_lr3": dict(distance="cosine", lr_img=3.0, init="noise"),
    "noise_l1_lr1": dict(distance="l1", lr_img=1.0, init="noise"),
}


def main() -> int:
    torch.set_num_threads(1)
    root = sys.argv[1] if len(sys.argv) > 1 else "demo-data"
    tr = PatchSet.load(glob.glob(f"{root}/C1/work/prepared/*/train")[0])
    te2 = PatchSet.load(glob.glob(f"{root}/C2/work/prepared/*/test")[0])
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else list(VARIANTS)
    rng = np.random.default_rng(0)
    rand_idx = np.concatenate([rng.choice(np.where(tr.labels == c)[0], 10, replace=False) for c in (0, 1)])
    for name in only:
        t = time.time()
        if name == "random":
            ps = tr.subset(rand_idx)
        else:
            cfg = DistillConfig.from_yaml(str(REPO / "configs" / "distill-cpu.yaml"), **{**BASE, **VARIANTS[name]})
            ps = run_distillation(tr, cfg, None, progress=False).patchset
        td = time.time() - t
        d = check_export(synthetic=ps, real=tr, accept_risk=False, require_audit=True, raise_on_block=False)
        ev = evaluate_sets({name: ps}, te2, "convnet", seeds=[0, 1], epochs=150, lr=0.01, batch_size=128,
                           augmentation="color_crop_cutout_flip_scale_rotate", arch_kwargs={"width": 32, "depth": 3},
                           progress=False)[name].summary()
        row = {"name": name, "distill_s": round(td, 1), "blocked": d.blocked, "gate": d.message()[:160],
               "c2_bal_acc": round(ev["balanced_accuracy_mean"], 3), "c2_auc": round(ev["auc_mean"], 3)}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
