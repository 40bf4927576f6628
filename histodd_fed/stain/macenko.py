"""Macenko stain estimation (offline, numpy), written from the paper's description.

Macenko et al. 2009: convert RGB to optical density (OD), keep tissue pixels (OD above a
threshold in every channel), take the plane of the two leading eigenvectors of the OD covariance,
project the tissue OD onto it, and take the directions at the 1st and 99th angle percentiles as the
haematoxylin and eosin stain vectors. Concentrations follow by least squares; the 99th percentile
of each stain's concentration is its "max concentration".

Images with too few tissue pixels (white background, blank glass) fall back to a reference H&E
matrix; nothing here returns NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Background intensity (Beer-Lambert incident light) on the 0-255 scale.
IO = 255.0
#: Reference H&E stain matrix (columns: haematoxylin, eosin; rows: R, G, B OD), Macenko's values.
REFERENCE_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]], dtype=np.float64)
#: Reference 99th-percentile concentrations of the two stains.
REFERENCE_MAX_CONC = np.array([1.9705, 1.0308], dtype=np.float64)


@dataclass(frozen=True)
class MacenkoParams:
    """Knobs of the estimator (defaults from Macenko et al.)."""

    od_threshold: float = 0.15      #: a pixel is tissue when its OD exceeds this in every channel
    alpha_percentile: float = 1.0   #: angle percentiles alpha and 100 - alpha
    max_conc_percentile: float = 99.0
    min_tissue_pixels: int = 16     #: fewer tissue pixels -> reference stains
    min_tissue_fraction: float = 0.02


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """uint8 or 0-255 float RGB (..., 3) -> optical density (..., 3), finite for black pixels."""
    x = np.asarray(rgb, dtype=np.float64)
    return -np.log((x + 1.0) / (IO + 1.0))


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_od`, clipped to 0-255 (float)."""
    return np.clip((IO + 1.0) * np.exp(-np.asarray(od)) - 1.0, 0.0, 255.0)


def _tissue_od(image: np.ndarray, params: MacenkoParams) -> np.ndarray | None:
    od = rgb_to_od(image).reshape(-1, 3)
    mask = np.all(od > params.od_threshold, axis=1)
    n = int(mask.sum())
    if n < max(params.min_tissue_pixels, int(params.min_tissue_fraction * od.shape[0])):
        return None
    return od[mask]


def stain_matrix(image: np.ndarray, params: MacenkoParams = MacenkoParams()) -> tuple[np.ndarray, bool]:
    """Macenko stain matrix (3, 2) of one RGB image (H, W, 3); columns are unit H and E vectors.

    Returns ``(matrix, estimated)``; ``estimated`` is False when the reference matrix was used.
    """
    tissue = _tissue_od(image, params)
    if tissue is None:
        return REFERENCE_STAINS.copy(), False
    cov = np.cov(tissue, rowvar=False)
    if not np.all(np.isfinite(cov)):
        return REFERENCE_STAINS.copy(), False
    _, vecs = np.linalg.eigh(cov)           # ascending eigenvalues
    plane = vecs[:, [2, 1]].copy()          # two leading eigenvectors
    # Orient each eigenvector toward the mean tissue OD so projections are mostly positive.
    mean_od = tissue.mean(axis=0)
    for k in range(2):
        if plane[:, k] @ mean_od < 0:
            plane[:, k] *= -1
    proj = tissue @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [params.alpha_percentile, 100.0 - params.alpha_percentile])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    # Haematoxylin has the larger red OD component.
    he = np.stack([v1, v2], axis=1) if v1[0] > v2[0] else np.stack([v2, v1], axis=1)
    he = np.abs(he)  # stain OD vectors are non-negative; tiny negative parts are noise
    norms = np.linalg.norm(he, axis=0)
    if not np.all(np.isfinite(he)) or np.any(norms < 1e-6) or abs(np.linalg.det(he.T @ he)) < 1e-8:
        return REFERENCE_STAINS.copy(), False
    return he / norms, True


def concentrations(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Least-squares stain concentrations (H*W, 2) of ``image`` under ``matrix`` (3, 2)."""
    od = rgb_to_od(image).reshape(-1, 3)
    return od @ np.linalg.pinv(matrix).T


def max_concentrations(image: np.ndarray, matrix: np.ndarray, params: MacenkoParams = MacenkoParams(),
                       estimated: bool = True) -> np.ndarray:
    """99th-percentile concentration of each stain (2,), reference values for background images."""
    if not estimated:
        return REFERENCE_MAX_CONC.copy()
    c = concentrations(image, matrix)
    mx = np.percentile(c, params.max_conc_percentile, axis=0)
    if not np.all(np.isfinite(mx)) or np.any(mx < 1e-3):
        return REFERENCE_MAX_CONC.copy()
    return mx


def estimate_stains(images: np.ndarray, params: MacenkoParams = MacenkoParams()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stain matrices (N, 3, 2), max concentrations (N, 2) and an ``estimated`` mask (N,) for uint8 NHWC."""
    n = len(images)
    mats = np.empty((n, 3, 2), dtype=np.float32)
    maxc = np.empty((n, 2), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    for i in range(n):
        m, est = stain_matrix(images[i], params)
        mats[i] = m
        maxc[i] = max_concentrations(images[i], m, params, est)
        ok[i] = est
    return mats, maxc, ok


def choose_template(images: np.ndarray, params: MacenkoParams = MacenkoParams()) -> int:
    """Index of the image whose per-channel pixel mean and std are closest to the whole set's.

    Only images with enough tissue for a Macenko estimate are eligible (when any exist).
    """
    x = np.asarray(images, dtype=np.float64)
    flat = x.reshape(len(x), -1, 3)
    img_mean, img_std = flat.mean(axis=1), flat.std(axis=1)
    set_mean = img_mean.mean(axis=0)
    set_std = np.sqrt((img_std**2 + (img_mean - set_mean) ** 2).mean(axis=0))
    dist = np.linalg.norm(img_mean - set_mean, axis=1) + np.linalg.norm(img_std - set_std, axis=1)
    order = np.argsort(dist, kind="stable")
    for i in order[: min(len(order), 64)]:
        if _tissue_od(x[i], params) is not None:
            return int(i)
    return int(order[0])
