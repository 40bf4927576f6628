"""Otsu, tissue masks and pyramid level selection."""

from __future__ import annotations

import numpy as np
import pytest

from histodd_fed.slides.reader import select_level
from histodd_fed.slides.tissue import otsu_threshold, tissue_mask


def _between_var(v: np.ndarray, t: float) -> float:
    a, b = v[v <= t], v[v > t]
    return len(a) * len(b) / len(v) ** 2 * (a.mean() - b.mean()) ** 2


def _brute_otsu(v: np.ndarray, bins: int = 256) -> float:
    """Threshold (a bin edge) maximising the between-class variance of the raw values."""
    hist, edges = np.histogram(v, bins=bins, range=(v.min(), v.max()))
    best, t_best = -1.0, None
    for i in range(1, bins):
        a, b = hist[:i], hist[i:]
        if a.sum() == 0 or b.sum() == 0:
            continue
        var = _between_var(v, edges[i])
        if var > best:
            best, t_best = var, edges[i]
    return float(t_best)


def test_otsu_on_bimodal_matches_brute_force():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(50, 6, 3000), rng.normal(190, 10, 1000)])
    t = otsu_threshold(v)
    assert 60 < t < 160
    # same split quality as an exhaustive search over thresholds (raw values, not bin centres)
    assert _between_var(v, t) == pytest.approx(_between_var(v, _brute_otsu(v)), rel=1e-3)
    # a threshold that is clearly not the optimum scores worse
    assert _between_var(v, 40.0) < 0.9 * _between_var(v, t)
    assert ((v > t) == (np.arange(len(v)) >= 3000)).mean() > 0.999


def test_otsu_degenerate():
    assert otsu_threshold(np.full(10, 3.0)) == 3.0
    with pytest.raises(ValueError):
        otsu_threshold(np.array([]))


def test_tissue_mask_finds_a_pink_disc():
    yy, xx = np.mgrid[0:120, 0:160]
    disc = (xx - 80) ** 2 + (yy - 60) ** 2 < 40 ** 2
    rgb = np.full((120, 160, 3), 242, np.uint8)
    rgb[disc] = (220, 120, 200)
    rng = np.random.default_rng(0)
    rgb = np.clip(rgb + rng.normal(0, 3, rgb.shape), 0, 255).astype(np.uint8)
    rgb[5:8, 5:8] = (200, 100, 180)  # a speck: removed as a small object
    mask, t = tissue_mask(rgb)
    iou = (mask & disc).sum() / (mask | disc).sum()
    assert iou > 0.95 and not mask[6, 6]
    assert 0.04 <= t <= 0.15


def test_tissue_mask_keeps_tissue_touching_the_border():
    rgb = np.zeros((50, 50, 3), np.uint8)
    rgb[:] = (200, 110, 190)
    mask, _ = tissue_mask(rgb)
    assert mask.all()


@pytest.mark.parametrize("ds,target,want", [
    ((1, 4, 16), 4.0, 1), ((1, 4, 16), 3.9, 0), ((1, 4, 16), 100, 2), ((1, 4, 16), 0.5, 0),
    ((1, 4, 16), 15.9, 1), ((1, 4, 16), 15.99, 2), ((1.0, 2.0005, 8.0), 4.0, 1), ((1.0, 4.0001, 16.0003), 4.0, 1),
])
def test_select_level(ds, target, want):
    assert select_level(ds, target) == want
