"""Image learning rate per resolution: the pixel gradient of Histo-DD's matching loss at 32 and 64 px.

For each image size and ipc, the paper preset (configs/distill-paper.yaml, or --config) is set up as a run
would be (PCam patches, stains, input normalisation, the model pool, the synthetic images from real
patches) and, for ``--draws`` draws of (pool model + model augmentation, real batch, one DSA op), the
gradient of each class's matching loss w.r.t. its synthetic images is taken - exactly the gradient the
per-class SGD step multiplies by ``lr_img``. Recorded: the mean |dLoss/dpixel| over pixels and draws, so a
first image step moves a pixel by ``lr * mean|g|`` on average (momentum 0.5 makes a steady step up to 2x).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lr_img.py --patches ../shared/data/pcam-ai4all/train \
        --per-class 100 --sizes 32,64 --ipcs 1,10,50 --draws 3 --out benchmarks/results/lr_img_pcam.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def measure(real, cfg, draws: int, work: Path) -> dict:
    from histodd_fed.augment import build_augmentation
    from histodd_fed.content_hash import data_hash
    from histodd_fed.distill.gradient import GradientMatching
    from histodd_fed.distill.initialisation import initial_images, plan_stages
    from histodd_fed.distill.model_aug import augment_model, matched_weights
    from histodd_fed.distill.objectives import StageInputs
    from histodd_fed.distill.pool import build_model, get_pool, input_stats
    from histodd_fed.patchset import PatchSet
    from histodd_fed.preprocess import resize_images
    from histodd_fed.stain.normalize import ImageStains, StainContext

    device = torch.device("cpu")
    images = resize_images(real.images, cfg.image_size)
    x_real, y_real = PatchSet(images=images, labels=real.labels, class_names=real.class_names).to_tensors()
    probe = build_augmentation(cfg.augmentation)
    ctx, real_st = (StainContext.from_images(images), ImageStains.estimate(images)) if probe.uses_stains else (None, None)
    aug = build_augmentation(cfg.augmentation, stain=ctx)
    singles = [build_augmentation(op, stain=ctx) for op in aug.ops]
    norm = input_stats(cfg, x_real)
    t0 = time.perf_counter()
    pool = get_pool(cfg, real.num_classes, x_real, y_real, aug, real_st, data_hash(real), work / "pool",
                    show_progress=False, norm=norm)
    t_pool = time.perf_counter() - t0
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    stages = plan_stages(real, cfg, rng)
    syn, syn_st = initial_images(stages, cfg, x_real, real_st, ctx, gen, device)
    x_syn = syn[0].clone().requires_grad_(True)
    stage = stages[0]
    offsets = np.cumsum([0] + [cfg.ipc] * len(stage))
    y_syn = [torch.full((cfg.ipc,), g.label, dtype=torch.long) for g in stage]
    inputs = StageInputs(stage, x_syn, syn_st[0], offsets, y_syn, x_real, y_real, real_st,
                         np.concatenate([g.real_idx for g in stage]), rng, gen)
    template = build_model(cfg, real.num_classes, norm)
    obj = GradientMatching(cfg, template, device)
    g_abs, losses, secs = [], [], []
    for _ in range(draws):
        net = copy.deepcopy(template)
        net.load_state_dict(pool.states[int(rng.integers(len(pool.states)))])
        augment_model(net, cfg.alpha, gen)
        net.train()
        weights = matched_weights(net, fc=cfg.match_fc)
        op = singles[int(torch.randint(len(singles), (1,), generator=gen))] if cfg.dsa_mode == "single" else aug
        for k in range(len(stage)):
            t = time.perf_counter()
            loss = obj.class_loss(inputs, k, net, weights, op)
            g = torch.autograd.grad(loss, x_syn)[0][int(offsets[k]):int(offsets[k + 1])]
            secs.append(time.perf_counter() - t)
            g_abs.append(float(g.abs().mean()))
            losses.append(float(loss))
    return {"image_size": cfg.image_size, "ipc": cfg.ipc, "mean_abs_grad": float(np.mean(g_abs)),
            "mean_abs_grad_per_draw": [round(v, 6) for v in g_abs], "loss_mean": float(np.mean(losses)),
            "seconds_per_class_step": float(np.mean(secs)), "pool_seconds": round(t_pool, 1),
            "lr_img_effective": cfg.effective_lr_img(),
            "first_step_mean_abs_delta": cfg.effective_lr_img() * float(np.mean(g_abs))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", default=str(REPO.parent / "shared/data/pcam-ai4all/train"))
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--config", default=str(REPO / "configs/distill-paper.yaml"))
    ap.add_argument("--sizes", default="32,64")
    ap.add_argument("--ipcs", default="1,10,50")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--set", default="{}", help="JSON of DistillConfig overrides (e.g. '{\"match_fc\": true}')")
    ap.add_argument("--work", default="/tmp/bench_lr_img.work")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from histodd_fed.distill import DistillConfig
    from histodd_fed.training.data import load_patches

    real = load_patches(a.patches, limit=a.per_class, seed=0)
    rows = []
    for size in [int(s) for s in a.sizes.split(",")]:
        for ipc in [int(i) for i in a.ipcs.split(",")]:
            cfg = DistillConfig.from_yaml(a.config, image_size=size, ipc=ipc, device="cpu", **json.loads(a.set))
            row = measure(real, cfg, a.draws, Path(a.work))
            row["overrides"] = json.loads(a.set)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "mean_abs_grad_per_draw"}), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "benchmarks/bench_lr_img.py", "args": vars(a), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
