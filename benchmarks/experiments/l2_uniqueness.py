"""The export gate's L2 rule with and without its uniqueness condition, on images nobody tuned it against.

The calibrated L2 rule blocks a synthetic image closer to a real patch than the real-real 1st percentile.
On PCam it also blocked near-white synthetic images (background) that sit at that distance from dozens of
blank real patches at once (2026-12-06: the best held-out candidates of seeds 1 and 2 of the pcam preset,
both next to the same white `train` patch). The uniqueness condition (``l2_unique_ratio``) keeps a flag only
when the nearest real patch stands out: squared distance <= ratio x the squared distance to the 8th-nearest
distinct real patch - the copy detector's reading of "stands out from chance", with its ratio and rank
(chosen on the copy detector's tune split, not here).

Per image, in the pcam preset's crop view and the resize view, against the 10,000 raw `train` patches:
- natural images that hold no reference patch: ``--n-null`` PCam `valid` patches;
- pixel-aligned copies of ``--n-attack`` random `train` patches: exact, Gaussian noise (sigma 0.01 / 0.02 /
  0.05 of the range), JPEG q90 / q50 (the L2 rule's own ground; transformed copies are the copy detector's);
- bland images: `train` patches whose low-passed grey std is below the copy detector's ``bland_std``, each
  with noise sigma 0.02 (a noisy copy of one blank patch: should stay flagged), and 100 means of 8 random
  ones (a synthetic image of background, as a mixture start makes it: singles none out).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/experiments/l2_uniqueness.py --out benchmarks/results/l2_uniqueness.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from histodd_fed.image_similarity import normalised_l2_matrix
from histodd_fed.patchset import load_image_folder
from histodd_fed.preprocess import ViewSpec, apply_view_images
from histodd_fed.privacy.copy_attacks import jpeg_images
from histodd_fed.privacy.memorisation import kth_distinct, real_real_l2

PCAM = Path("../shared/data/pcam-ai4all")
VIEWS = {"crop 32": ViewSpec(source_size=96, crop=32, size=None), "resize 32": ViewSpec(source_size=96, crop=None, size=32)}


def tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def noisy(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.round(x + rng.normal(0, 255 * sigma, x.shape)), 0, 255).astype(np.uint8)


def grey_std(x: np.ndarray) -> np.ndarray:
    g = tensor(x).mean(1, keepdim=True)
    g = torch.nn.functional.avg_pool2d(g, 2)
    return g.flatten(1).std(1).numpy()


def reference_p1(xr: torch.Tensor, n: int = 1000, seed: int = 0) -> float:
    """The gate's real-real 1st percentile (``analyse_memorisation``'s reference)."""
    return float(np.percentile(real_real_l2(xr, n, seed)[1].min(1).values.numpy(), 1.0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-null", type=int, default=500)
    ap.add_argument("--n-attack", type=int, default=100)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--bland-std", type=float, default=0.03)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    t0 = time.perf_counter()
    train = load_image_folder(PCAM / "train")
    valid = load_image_folder(PCAM / "valid")
    rng = np.random.default_rng(a.seed)
    null_i = rng.choice(len(valid), a.n_null, replace=False)
    src_i = rng.choice(len(train), a.n_attack, replace=False)
    rows = {}
    for vname, view in VIEWS.items():
        real = apply_view_images(train.images, view)
        xr = tensor(real)
        p1 = reference_p1(xr)
        bland_i = np.flatnonzero(grey_std(real) < a.bland_std)
        src = real[src_i]
        arng = np.random.default_rng(a.seed + 1)
        probes = {"natural (valid)": apply_view_images(valid.images[null_i], view),
                  "exact copy": src, "noise 0.01": noisy(src, 0.01, arng), "noise 0.02": noisy(src, 0.02, arng),
                  "noise 0.05": noisy(src, 0.05, arng), "JPEG q90": jpeg_images(src, 90), "JPEG q50": jpeg_images(src, 50),
                  "bland + noise 0.02": noisy(real[bland_i], 0.02, arng),
                  "mean of 8 bland": np.stack([real[arng.choice(bland_i, 8, replace=False)].mean(0)
                                               for _ in range(100)]).round().astype(np.uint8)}
        for pname, imgs in probes.items():
            d = normalised_l2_matrix(tensor(imgs), xr)
            d1 = d.min(1).values.numpy().astype(np.float64)
            kth = kth_distinct(d, a.rank)
            old = d1 < p1
            new = old & (d1 ** 2 <= a.ratio * kth ** 2)
            rows.setdefault(pname, {})[vname] = {"n": int(len(imgs)), "flagged_old": int(old.sum()),
                                                 "flagged_new": int(new.sum()), "p1": round(p1, 5),
                                                 "median_d1": round(float(np.median(d1)), 5),
                                                 "median_ratio": round(float(np.median(d1 ** 2 / np.maximum(kth, 1e-12) ** 2)), 4)}
        print(f"{vname}: p1 {p1:.4f}, {len(bland_i)} bland train patches", flush=True)
    rec = {"ratio": a.ratio, "rank": a.rank, "bland_std": a.bland_std, "seed": a.seed, "n_real": len(train),
           "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    tmp.replace(a.out)
    print("| probe | crop 32: old / new flagged (n) | resize 32: old / new flagged (n) |")
    print("|---|---|---|")
    for pname, r in rows.items():
        c, z = r["crop 32"], r["resize 32"]
        print(f"| {pname} | {c['flagged_old']} / {c['flagged_new']} ({c['n']}) | {z['flagged_old']} / {z['flagged_new']} ({z['n']}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
