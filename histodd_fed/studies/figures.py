"""Figure 1a: a grid of synthetic vs initial vs real patches, per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histodd_fed.errors import InputError
from histodd_fed.patchset import PatchSet
from histodd_fed.studies.plots import _figure, save_figure


def patch_grid(path: str | Path, rows: dict[str, PatchSet], per_class: int = 8, seed: int = 0,
               title: str = "Synthetic vs initial vs real patches") -> Path:
    """Save a grid: for each class, one row per named set (e.g. synthetic, initial, real) with up to
    ``per_class`` patches (the first ones for synthetic/initial sets, a seeded sample for larger sets)."""
    if not rows:
        raise InputError("patch grid: no sets given")
    classes = next(iter(rows.values())).class_names
    for name, ps in rows.items():
        if list(ps.class_names) != list(classes):
            raise InputError(f"patch grid: set {name!r} has classes {ps.class_names}, expected {classes}")
    rng = np.random.default_rng(seed)
    plt = _figure()
    n_rows = len(classes) * len(rows)
    fig, axes = plt.subplots(n_rows, per_class, figsize=(per_class * 0.9 + 1.2, n_rows * 0.95), squeeze=False)
    r = 0
    for ci, cname in enumerate(classes):
        for name, ps in rows.items():
            idx = np.flatnonzero(ps.labels == ci)
            if len(idx) > per_class:
                idx = np.sort(rng.choice(idx, per_class, replace=False)) if ps.kind == "real" and len(idx) > 4 * per_class \
                    else idx[:per_class]
            for j in range(per_class):
                ax = axes[r, j]
                ax.set_xticks([])
                ax.set_yticks([])
                for s in ax.spines.values():
                    s.set_visible(False)
                if j < len(idx):
                    ax.imshow(np.asarray(ps.images[idx[j]]), interpolation="nearest")
            axes[r, 0].set_ylabel(f"{cname}\n{name}", rotation=0, ha="right", va="center", fontsize=8)
            r += 1
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
