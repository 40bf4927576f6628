"""Loading evaluation data: patch-set directories or image folders, capped per class, in a view
(:mod:`histodd_fed.preprocess`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histodd_fed.patchset import PatchSet, load_image_folder
from histodd_fed.preprocess import ViewSpec, prepare


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
                 seed: int = 0, crop_center: int | None = None, view: ViewSpec | None = None,
                 where: str | None = None) -> PatchSet:
    """Load a patch-set directory or an image folder (``CLASS/*.jpg``), capped per class, in a view.

    ``view``: put the patches in that view (:func:`histodd_fed.preprocess.to_view`: raw patches of
    ``view.source_size`` px are cropped / resized; patches that record the same view are kept; any
    other patches raise one-line ``InputError``). Without ``view``: ``crop_center`` keeps the central
    N px of raw patches. Then ``image_size`` resizes. The result records its view in ``meta["view"]``.
    """
    path = Path(path)
    if path.is_dir() and not (path / "patchset.json").exists():
        ps = load_image_folder(path, size=None, limit_per_class=limit, seed=seed)
    else:
        ps = limit_per_class(PatchSet.load(path), limit, seed)
    return prepare(ps, view=view, crop=crop_center, size=image_size, where=where or str(path))
