"""A generated, separable patch set for smoke runs and tests (no real data needed).

Each class has its own mean colour and a class-specific stripe orientation, plus per-pixel noise:
easy for any CNN, yet not identical images, so coresets and distillation have something to pick.
"""

from __future__ import annotations

import numpy as np

from histodd_fed.patchset import PatchSet

_BASE_COLOURS = np.array([[200, 120, 170], [110, 60, 160], [220, 180, 200], [90, 110, 70]], dtype=np.float64)


def make_toy_patchset(n_per_class: int = 20, size: int = 16, num_classes: int = 2, seed: int = 0,
                      noise: float = 25.0) -> PatchSet:
    """``num_classes`` (<= 4) classes of ``n_per_class`` uint8 ``size`` x ``size`` patches."""
    if not 1 <= num_classes <= len(_BASE_COLOURS):
        raise ValueError(f"num_classes must be in 1..{len(_BASE_COLOURS)}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images, labels = [], []
    for c in range(num_classes):
        stripes = np.sin((xx if c % 2 == 0 else yy) * (2 * np.pi / max(4, size // 4)))[..., None] * 30.0
        for _ in range(n_per_class):
            img = _BASE_COLOURS[c][None, None, :] + stripes + rng.normal(0.0, noise, size=(size, size, 3))
            images.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(c)
    perm = rng.permutation(len(labels))
    return PatchSet(images=np.stack(images)[perm], labels=np.asarray(labels)[perm],
                    class_names=[f"class{c}" for c in range(num_classes)], kind="real",
                    meta={"source": f"toy(n_per_class={n_per_class}, size={size}, seed={seed})"})
