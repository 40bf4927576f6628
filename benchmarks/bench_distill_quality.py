"""Quality check: Histo-DD synthetic set vs a random real subset of the same size, on real PCam.

For each seed: distil the training subset with the given config, draw a random real subset with
``ipc`` images per class, train a fresh ConvNet on each (same recipe, same augmentation) and
evaluate accuracy on a ``valid`` subset. Prints a Markdown table and writes JSON.

    timeout 3000 .venv/bin/python benchmarks/bench_distill_quality.py --config configs/distill-cpu.yaml \
        --train-per-class 500 --valid-per-class 500 --seeds 0 1 2 --json results/distill_quality.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from histodd_fed.augment import build_augmentation  # noqa: E402
from histodd_fed.distill import DistillConfig, resize_images, run_distillation  # noqa: E402
from histodd_fed.models import create_model  # noqa: E402
from histodd_fed.patchset import load_image_folder  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "pcam-ai4all"


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255)


def train_and_eval(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor, seed: int, epochs: int,
                   width: int, strategy: str) -> float:
    """DC-style evaluation: fresh ConvNet, SGD lr 0.01 momentum 0.9, lr /10 at half, DSA augmentation."""
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10_000 + seed)
        net = create_model("convnet", num_classes=2, image_size=x.shape[-1], width=width)
    aug = build_augmentation(strategy)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [epochs // 2], 0.1)
    net.train()
    for _ in range(epochs):
        loss = F.cross_entropy(net(aug(x, g)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(xv[i:i + 500]).argmax(1) for i in range(0, len(xv), 500)])
    return float((pred == yv).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "distill-cpu.yaml"))
    ap.add_argument("--set", nargs="*", default=[], help="config overrides k=v (YAML values)")
    ap.add_argument("--train-per-class", type=int, default=500)
    ap.add_argument("--valid-per-class", type=int, default=500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-epochs", type=int, default=300)
    ap.add_argument("--eval-width", type=int, default=64)
    ap.add_argument("--eval-aug", default="color_crop_cutout_flip_scale_rotate")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    base = DistillConfig.from_yaml(args.config, **overrides)
    size = base.image_size
    valid = load_image_folder(DATA / "valid", size=size, limit_per_class=args.valid_per_class, seed=123)
    xv, yv = to_tensor(valid.images), torch.from_numpy(valid.labels)
    rows = []
    for seed in args.seeds:
        train = load_image_folder(DATA / "train", size=None, limit_per_class=args.train_per_class, seed=seed)
        cfg = DistillConfig.from_dict(base.to_dict(), seed=seed)
        t0 = time.perf_counter()
        res = run_distillation(train, cfg, work_dir=None, progress=False)
        t_dist = time.perf_counter() - t0
        syn = res.patchset
        rng = np.random.default_rng(50_000 + seed)
        rand_idx = np.concatenate([rng.choice(np.flatnonzero(train.labels == c), cfg.ipc, replace=False)
                                   for c in range(train.num_classes)])
        small = resize_images(train.images, size)
        sets = {"random": (small[rand_idx], train.labels[rand_idx]),
                "init": (res.initial_images, syn.labels),
                "histodd": (syn.images, syn.labels)}
        row = {"seed": seed, "distill_s": round(t_dist, 1)}
        for name, (im, lab) in sets.items():
            row[name] = train_and_eval(to_tensor(im), torch.from_numpy(lab), xv, yv, seed, args.eval_epochs,
                                       args.eval_width, args.eval_aug)
        rows.append(row)
        print(json.dumps(row), flush=True)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("random", "init", "histodd", "distill_s")}
    print("\n| seed | random real | init (real) | Histo-DD | distil s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['random']:.4f} | {r['init']:.4f} | {r['histodd']:.4f} | {r['distill_s']} |")
    print(f"| mean | {mean['random']:.4f} | {mean['init']:.4f} | {mean['histodd']:.4f} | {mean['distill_s']:.1f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": base.to_dict(), "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows, "mean": mean}, indent=2))


if __name__ == "__main__":
    main()
