"""Loading evaluation data: patch-set directories or image folders, resized and capped per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histodd_fed.errors import InputError
from histodd_fed.patchset import PatchSet, load_image_folder


def resize_patchset(ps: PatchSet, size: int) -> PatchSet:
    """A copy of ``ps`` with every patch resized to ``size`` x ``size`` (bilinear, as the importer)."""
    if ps.image_size == size and ps.images.shape[2] == size:
        return ps
    from PIL import Image

    out = np.stack([np.asarray(Image.fromarray(np.asarray(im)).resize((size, size), Image.BILINEAR), dtype=np.uint8)
                    for im in ps.images]) if len(ps) else np.zeros((0, size, size, 3), np.uint8)
    new = ps.subset(np.arange(len(ps)))
    new.images = out
    new.meta = {**new.meta, "resized_to": size}
    new.validate()
    return new


def center_crop_patchset(ps: PatchSet, size: int | None) -> PatchSet:
    """A copy of ``ps`` keeping the central ``size`` x ``size`` pixels of every patch (``None``: unchanged).

    PCam's label is defined by the central 32 x 32 region of each 96 x 96 patch, so a centre crop
    keeps the label-defining tissue at full resolution where a 3x downscale blurs it.
    """
    if size is None:
        return ps
    h, w = ps.images.shape[1:3]
    if size > min(h, w) or size < 1:
        raise InputError(f"centre crop {size} px does not fit patches of {h}x{w} px")
    if size == h and size == w:
        return ps
    top, left = (h - size) // 2, (w - size) // 2
    new = ps.subset(np.arange(len(ps)))
    new.images = np.ascontiguousarray(ps.images[:, top:top + size, left:left + size])
    new.meta = {**new.meta, "center_crop": size}
    new.validate()
    return new


def limit_per_class(ps: PatchSet, limit: int | None, seed: int = 0) -> PatchSet:
    """A seeded random subset with at most ``limit`` patches per class (``None``: unchanged)."""
    if limit is None:
        return ps
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(ps.num_classes):
        idx = np.flatnonzero(ps.labels == c)
        keep.append(np.sort(rng.choice(idx, size=limit, replace=False)) if len(idx) > limit else idx)
    return ps.subset(np.sort(np.concatenate(keep)))


def load_patches(path: str | Path, *, image_size: int | None = None, limit: int | None = None,
                 seed: int = 0, crop_center: int | None = None) -> PatchSet:
    """Load a patch-set directory or an image folder (``CLASS/*.jpg``), optionally centre-cropped
    (``crop_center`` px, before resizing), resized and capped."""
    path = Path(path)
    if path.is_dir() and not (path / "patchset.json").exists():
        if crop_center is None:
            return load_image_folder(path, size=image_size, limit_per_class=limit, seed=seed)
        ps = load_image_folder(path, size=None, limit_per_class=limit, seed=seed)
    else:
        ps = limit_per_class(PatchSet.load(path), limit, seed)
    ps = center_crop_patchset(ps, crop_center)
    return resize_patchset(ps, image_size) if image_size else ps
