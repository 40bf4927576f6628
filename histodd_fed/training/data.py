"""Loading evaluation data: patch-set directories or image folders, resized and capped per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
                 seed: int = 0) -> PatchSet:
    """Load a patch-set directory or an image folder (``CLASS/*.jpg``), optionally resized and capped."""
    path = Path(path)
    if path.is_dir() and not (path / "patchset.json").exists():
        return load_image_folder(path, size=image_size, limit_per_class=limit, seed=seed)
    ps = limit_per_class(PatchSet.load(path), limit, seed)
    return resize_patchset(ps, image_size) if image_size else ps
