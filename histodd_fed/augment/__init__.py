"""Differentiable (siamese) augmentation with stain normalisation, shared by distillation and training.

``build_augmentation(strategy, stain=None)`` returns an :class:`Augmentation`; call it as
``aug(x, generator)`` to augment a float (B, 3, H, W) batch in [0, 1] with per-image draws.
"""

from __future__ import annotations

from histodd_fed.augment.dsa import ORDER, AugDraw, Augmentation, DSAParams, parse_strategy
from histodd_fed.stain.normalize import StainContext

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate_stain"


def build_augmentation(strategy: str | None = DEFAULT_STRATEGY, stain: StainContext | None = None,
                       params: DSAParams = DSAParams()) -> Augmentation:
    """An augmentation for ``strategy`` (e.g. ``"color_crop_cutout_flip_scale_rotate_stain"``).

    A ``stain`` / ``stainmatrix`` op without a ``stain`` context uses the reference H&E template.
    """
    ops = parse_strategy(strategy)
    if ("stain" in ops or "stainmatrix" in ops) and stain is None:
        stain = StainContext.reference()
    return Augmentation(strategy, stain=stain, params=params)


__all__ = ["AugDraw", "Augmentation", "DEFAULT_STRATEGY", "DSAParams", "ORDER", "build_augmentation", "parse_strategy"]
