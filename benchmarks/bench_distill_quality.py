"""Quality check: Histo-DD synthetic set vs a random real subset of the same size, on real PCam.

For each seed: distil the training subset with the given config, draw a random real subset with
``ipc`` images per class, train a fresh ConvNet on each (same recipe, same augmentation) and
evaluate accuracy on a ``valid`` subset. Prints a Markdown table and writes JSON.

    timeout 900 .venv/bin/python benchmarks/bench_distill_quality.py --config configs/distill-cpu.yaml \
        --crop-center 32 --train-per-class 500 --valid-per-class 500 --seeds 0 1 2 --eval-epochs 200 \
        --eval-width 32 --json results/distill_quality.json

Tune with ``--tune`` (evaluates on train patches disjoint from every training subset), report on valid.
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
        net = create_model("convnet", num_classes=2, image_size=x.shape[-1], width=width).to(x.device)
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


def _subset(ps, per_class: int, seed: int, exclude: np.ndarray | None = None):
    """Seeded ``per_class`` patches per class of ``ps``, avoiding indices in ``exclude``."""
    rng = np.random.default_rng(seed)
    idx = []
    for c in range(ps.num_classes):
        pool = np.flatnonzero(ps.labels == c)
        if exclude is not None:
            pool = np.setdiff1d(pool, exclude)
        idx.append(np.sort(rng.choice(pool, min(per_class, len(pool)), replace=False)))
    return np.concatenate(idx)


_CACHE: dict = {}


def load_split(args, split: str, per_class: int, seed: int, size: int, exclude: np.ndarray | None = None):
    """(PatchSet at ``size`` px, chosen indices) of ``split``: from ``--data`` (exported PatchSets)
    or the PCam folder, optionally centre-cropped (``--crop-center``) before resizing."""
    from histodd_fed.patchset import PatchSet
    from histodd_fed.preprocess import ViewSpec, apply_view

    if split not in _CACHE:
        full = PatchSet.load(args.data / split) if args.data is not None else load_image_folder(DATA / split, size=None)
        _CACHE[split] = full
    full = _CACHE[split]
    idx = _subset(full, per_class, seed, exclude)
    sub = full.subset(idx)
    crop = args.crop_center or sub.image_size
    return apply_view(sub, ViewSpec.centre_crop(sub.image_size, crop, size)), idx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "distill-cpu.yaml"))
    ap.add_argument("--set", nargs="*", default=[], help="config overrides k=v (YAML values)")
    ap.add_argument("--variants", default=None,
                    help='JSON {"name": {overrides}, ...}: several distillation variants per seed')
    ap.add_argument("--data", type=Path, default=None, help="folder with train/ and valid/ PatchSets (pre-resized)")
    ap.add_argument("--crop-center", type=int, default=None,
                    help="keep the central N px of each patch before resizing (PCam's label region: 32)")
    ap.add_argument("--tune", action="store_true",
                    help="evaluate on a held-out split of train (disjoint from the training subsets) instead of valid")
    ap.add_argument("--train-per-class", type=int, default=500)
    ap.add_argument("--valid-per-class", type=int, default=500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-epochs", type=int, default=300)
    ap.add_argument("--eval-width", type=int, default=64)
    ap.add_argument("--eval-aug", default="color_crop_cutout_flip_scale_rotate")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default=None, help="override the config's device")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.device:
        overrides["device"] = args.device
    base = DistillConfig.from_yaml(args.config, **overrides)
    variants = json.loads(args.variants) if args.variants else {"histodd": {}}
    size = base.image_size
    dev = torch.device("cuda" if (base.device == "auto" and torch.cuda.is_available()) else
                       (base.device if base.device != "auto" else "cpu"))
    if args.tune:  # tuning split: train patches never used for training in any seed below
        used = np.unique(np.concatenate([load_split(args, "train", args.train_per_class, s, size)[1] for s in args.seeds]))
        valid, _ = load_split(args, "train", args.valid_per_class, 123, size, exclude=used)
    else:
        valid, _ = load_split(args, "valid", args.valid_per_class, 123, size)
    xv, yv = to_tensor(valid.images).to(dev), torch.from_numpy(valid.labels).to(dev)

    def evaluate(images, labels, seed):
        return train_and_eval(to_tensor(images).to(dev), torch.from_numpy(labels).to(dev), xv, yv, seed,
                              args.eval_epochs, args.eval_width, args.eval_aug)

    rows = []
    for seed in args.seeds:
        train, _ = load_split(args, "train", args.train_per_class, seed, size)
        rng = np.random.default_rng(50_000 + seed)
        rand_idx = np.concatenate([rng.choice(np.flatnonzero(train.labels == c), base.ipc, replace=False)
                                   for c in range(train.num_classes)])
        row = {"seed": seed, "random": evaluate(train.images[rand_idx], train.labels[rand_idx], seed)}
        for name, ov in variants.items():
            cfg = DistillConfig.from_dict(base.to_dict(), seed=seed, **ov)
            t0 = time.perf_counter()
            res = run_distillation(train, cfg, work_dir=None, progress=False)
            row[f"{name}_s"] = round(time.perf_counter() - t0, 1)
            if "init" not in row:
                row["init"] = evaluate(res.initial_images, res.patchset.labels, seed)
            row[name] = evaluate(res.patchset.images, res.patchset.labels, seed)
        rows.append(row)
        print(json.dumps(row), flush=True)
    keys = ["random", "init"] + list(variants)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    mean.update({f"{k}_s": float(np.mean([r[f"{k}_s"] for r in rows])) for k in variants})
    print("\n| seed | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1))
    for r in rows:
        print(f"| {r['seed']} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |")
    print("| mean | " + " | ".join(f"{mean[k]:.4f}" for k in keys) + " |")
    print("distil seconds (mean): " + ", ".join(f"{k} {mean[k + '_s']:.1f}" for k in variants))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": base.to_dict(), "variants": variants,
                                         "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows, "mean": mean}, indent=2))


if __name__ == "__main__":
    main()
