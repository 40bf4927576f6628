"""Re-staining real patches into another centre's stains (Macenko, numpy).

A :class:`StainProfile` describes one centre's stains from a few of its tiles: every tile's Macenko
stain matrix (3, 2) and 99th-percentile concentrations (2,) (:mod:`histodd_fed.stain.macenko`), their
mean, and their spread across tiles. :func:`restain` maps images into a profile:

    C_i   = pinv(M_i) OD_i                 each image's own concentrations under its own Macenko matrix
    C'_i  = C_i * (m_T / m_S) * j_i        one centre-level factor per stain (target over source
                                           99th-percentile concentration), times a per-image jitter j_i
    OD'_i = M'_i C'_i                      M'_i: the target's mean matrix plus per-image jitter

``m_S`` is ONE value for the whole source set (not each image's own maximum), so the relative
darkness between images - PCam's tumour cue - survives; per-image max rescaling would erase it
(docs/federation.md, "Fine-tuning protocol"). The jitters are drawn from the spread across the
target centre's tiles: ``M'_i`` columns = mean + N(0, std across tiles), renormalised; ``log j_i`` ~
N(0, std of log max concentration across tiles). Images without enough tissue for a Macenko
estimate use the reference H&E matrix for the separation (their concentrations are near zero, so
they stay near white).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from histodd_fed.errors import InputError
from histodd_fed.stain import macenko


@dataclass(frozen=True)
class StainProfile:
    """A centre's stains: per-tile Macenko matrices (T, 3, 2) and max concentrations (T, 2)."""

    matrices: np.ndarray
    max_conc: np.ndarray
    name: str = ""

    @property
    def matrix(self) -> np.ndarray:
        """Mean stain matrix (3, 2), unit columns."""
        m = self.matrices.mean(axis=0)
        return m / np.linalg.norm(m, axis=0, keepdims=True)

    @property
    def matrix_std(self) -> np.ndarray:
        return self.matrices.std(axis=0)

    @property
    def conc(self) -> np.ndarray:
        """Centre-level 99th-percentile concentration per stain (geometric mean over tiles)."""
        return np.exp(np.log(self.max_conc).mean(axis=0))

    @property
    def log_conc_std(self) -> np.ndarray:
        return np.log(self.max_conc).std(axis=0)

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "n_images": int(len(self.matrices)), "matrix": self.matrix.round(4).tolist(),
             "matrix_std": self.matrix_std.round(4).tolist(), "max_conc": self.conc.round(4).tolist(),
             "log_max_conc_std": self.log_conc_std.round(4).tolist()}
        if len(self.matrices) <= 32:  # a few tiles: keep each one's estimate
            d.update(tile_matrices=self.matrices.round(4).tolist(), tile_max_conc=self.max_conc.round(4).tolist())
        return d

    @classmethod
    def from_images(cls, images: Sequence[np.ndarray] | np.ndarray, name: str = "",
                    params: macenko.MacenkoParams = macenko.MacenkoParams()) -> "StainProfile":
        """Profile from RGB uint8 images (tiles); only images with a Macenko estimate count."""
        mats, maxc = [], []
        for im in images:
            m, est = macenko.stain_matrix(np.asarray(im), params)
            if est:
                mats.append(m)
                maxc.append(macenko.max_concentrations(im, m, params, True))
        if not mats:
            raise InputError(f"{name or 'stain profile'}: no image had enough tissue for a Macenko estimate")
        return cls(np.stack(mats).astype(np.float64), np.stack(maxc).astype(np.float64), name)


def set_profile(images: np.ndarray, name: str = "", max_images: int = 2000, seed: int = 0) -> StainProfile:
    """Profile of a patch set (per-image estimates of at most ``max_images`` random images)."""
    idx = np.arange(len(images))
    if len(idx) > max_images:
        idx = np.sort(np.random.default_rng(seed).choice(len(idx), max_images, replace=False))
    return StainProfile.from_images([images[i] for i in idx], name=name)


def stain_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean angle (degrees) between corresponding stain vectors of two (3, 2) matrices."""
    cos = np.clip((a * b).sum(axis=0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0)), -1, 1)
    return float(np.degrees(np.arccos(cos)).mean())


def restain(images: np.ndarray, source: StainProfile, target: StainProfile, *, seed: int = 0,
            jitter: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """Images (N, H, W, 3) uint8 re-stained into ``target`` (see the module doc); (images, info)."""
    rng = np.random.default_rng(seed)
    n, h, w, _ = images.shape
    out = np.empty_like(images)
    base_scale = target.conc / np.maximum(source.conc, 1e-3)
    tm, tm_std, lstd = target.matrix, target.matrix_std, target.log_conc_std
    n_ref = 0
    for i in range(n):
        m_i, est = macenko.stain_matrix(images[i])
        n_ref += int(not est)
        conc = macenko.concentrations(images[i], m_i)                      # (HW, 2)
        if jitter:
            mt = np.abs(tm + rng.normal(size=(3, 2)) * tm_std)
            mt = mt / np.maximum(np.linalg.norm(mt, axis=0, keepdims=True), 1e-6)
            scale = base_scale * np.exp(rng.normal(size=2) * lstd)
        else:
            mt, scale = tm, base_scale
        out[i] = np.round(macenko.od_to_rgb((conc * scale) @ mt.T)).reshape(h, w, 3).astype(np.uint8)
    info = {"scale": base_scale.round(4).tolist(), "jitter": bool(jitter), "reference_separation": n_ref}
    return out, info


def load_rgb(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"{path}: unreadable image ({exc})") from exc
