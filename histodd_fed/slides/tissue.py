"""Tissue detection: Otsu thresholding (numpy) on saturation, morphological clean-up (scipy)."""

from __future__ import annotations

import numpy as np


def otsu_threshold(values: np.ndarray, bins: int = 256, value_range: tuple[float, float] | None = None) -> float:
    """Otsu's threshold: the cut maximising between-class variance of a histogram of ``values``.

    Returns a value ``t``; the foreground is ``values > t``.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("otsu_threshold of an empty array")
    lo, hi = value_range if value_range is not None else (float(v.min()), float(v.max()))
    if hi <= lo:
        return float(lo)
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    p = hist.astype(np.float64) / hist.sum()
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)  # weight of class "<= bin i"
    m = np.cumsum(p * centres)
    mt = m[-1]
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 - m) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    # the maximum is often a plateau (empty bins between the modes): take its middle
    best = between.max()
    i = int(np.argmax(between))
    j = i
    while j + 1 < len(between) and between[j + 1] >= best * (1 - 1e-9):
        j += 1
    return float((edges[i + 1] + edges[j + 1]) / 2)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of uint8 RGB (H, W, 3)."""
    a = rgb.astype(np.float32)
    mx, mn = a.max(axis=-1), a.min(axis=-1)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0).astype(np.float32)


def tissue_mask(rgb: np.ndarray, min_threshold: float = 0.04, max_threshold: float = 0.15,
                closing: int = 2, opening: int = 2, min_object_fraction: float = 0.0005) -> tuple[np.ndarray, float]:
    """Tissue mask of a low-resolution RGB image and the saturation threshold used.

    Otsu on HSV saturation, clamped to ``[min_threshold, max_threshold]`` so that an image that
    is nearly all tissue (or nearly all glass) is not split in two; then closing, hole filling,
    opening, and removal of connected components smaller than ``min_object_fraction`` of the image.
    Very dark pixels (grey < 25, pen marks, scanner borders) are never tissue.
    """
    from scipy import ndimage as ndi

    sat = saturation(rgb)
    t = float(np.clip(otsu_threshold(sat, value_range=(0.0, 1.0)), min_threshold, max_threshold))
    grey = rgb.astype(np.float32).mean(axis=-1)
    mask = (sat > t) & (grey > 25)
    if closing:
        pad = closing + 1  # pad by edge values so tissue touching the border is not eroded
        padded = np.pad(mask, pad, mode="edge")
        padded = ndi.binary_closing(padded, structure=np.ones((3, 3), bool), iterations=closing)
        mask = padded[pad:-pad, pad:-pad]
    mask = ndi.binary_fill_holes(mask)
    if opening:
        mask = ndi.binary_opening(mask, structure=np.ones((3, 3), bool), iterations=opening)
    lab, n = ndi.label(mask)
    if n:
        sizes = np.bincount(lab.ravel())
        small = sizes < max(1, min_object_fraction * mask.size)
        small[0] = False
        mask[small[lab]] = False
    return mask, t
