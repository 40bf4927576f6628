"""Pixel and feature similarity between patches: SSIM (gaussian window), normalised L2, cosine.

All functions take float tensors in [0, 1], shape (N, C, H, W), and work on the CPU in chunks so
that all-pairs searches over a few thousand 32-96 px patches fit in memory.

- **SSIM** (Wang et al. 2004): local means, variances and covariance under a gaussian window
  (default 11 px, sigma 1.5, shrunk to the image for tiny patches), constants
  ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` with ``L = 1``; averaged over the valid window
  positions and the channels. 1 means identical; higher is closer.
- **Normalised L2**: root-mean-square difference of the [0, 1] pixel values,
  ``||x - y||_2 / sqrt(C H W)``; 0 means identical, lower is closer.
- **Cosine distance**: ``1 - cos(f(x), f(y))`` in an encoder's feature space; lower is closer.
- **Structure correlation**: Pearson correlation of the low-passed grey images (average-pooled by
  ``pool``), in [-1, 1]; higher is closer. Invariant to brightness / contrast changes and, by the
  low pass, insensitive to added pixel noise: a real patch plus noise or a colour shift keeps its
  nuclear layout, which this sees and SSIM / L2 at full resolution can miss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """A normalised 1-D gaussian of odd length ``size``."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return (g / g.sum()).float()


def effective_window(image_size: int, window: int) -> int:
    """The window actually used: ``window`` shrunk to the largest odd size <= ``image_size``."""
    w = min(int(window), int(image_size))
    return w if w % 2 == 1 else w - 1


def band_matrix(taps: torch.Tensor, n: int, reflect: bool = False) -> torch.Tensor:
    """Correlation with ``taps`` along an axis of length ``n`` as a matrix: valid padding, (n - w + 1, n); or with
    ``reflect`` padding (``F.pad(mode="reflect")``: the edge sample not repeated), (n, n)."""
    w = int(taps.numel())
    if not reflect:
        out = torch.zeros(n - w + 1, n, dtype=taps.dtype)
        for i in range(n - w + 1):
            out[i, i:i + w] = taps
        return out
    r = w // 2
    out = torch.zeros(n, n, dtype=taps.dtype)
    for i in range(n):
        for t in range(w):
            j = i + t - r
            j = -j if j < 0 else (2 * (n - 1) - j if j > n - 1 else j)
            out[i, j] += taps[t]
    return out


@dataclass
class _Blur:
    """A separable gaussian filter (valid padding), the same on every channel.

    Applied as two small matrix products (``B_h @ x @ B_w^T``), which a CPU runs 5-15x faster than the
    equivalent grouped convolutions, with the same sums. The band matrices are made once per axis length and dtype.
    """

    taps: torch.Tensor
    bands: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def make(cls, image_size: int, window: int = 11, sigma: float = 1.5) -> "_Blur":
        return cls(gaussian_window(effective_window(image_size, window), sigma))

    def _band(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        if (n, dtype) not in self.bands:
            self.bands[(n, dtype)] = band_matrix(self.taps, n).to(dtype)
        return self.bands[(n, dtype)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._band(x.shape[-2], x.dtype) @ x @ self._band(x.shape[-1], x.dtype).T


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM of each pair ``(x[i], y[i])``; broadcasts a batch of 1 against N. Returns (N,)."""
    if x.dim() != 4 or y.dim() != 4 or x.shape[1:] != y.shape[1:]:
        raise ValueError(f"ssim: need (N,C,H,W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = torch.broadcast_tensors(x.float(), y.float())
    blur = _Blur.make(min(x.shape[2], x.shape[3]), window, sigma)
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    num = (2 * mx * my + SSIM_C1) * (2 * sxy + SSIM_C2)
    den = (mx * mx + my * my + SSIM_C1) * (sxx + syy + SSIM_C2)
    return (num / den).flatten(1).mean(1)


class SSIMIndex:
    """Precomputed local statistics of a reference set, for fast SSIM of queries against it."""

    def __init__(self, reference: torch.Tensor, window: int = 11, sigma: float = 1.5, chunk: int = 4096):
        self.ref = reference.float()
        self.blur = _Blur.make(min(reference.shape[2], reference.shape[3]), window, sigma)
        mus, vars_ = [], []
        for s in range(0, len(self.ref), chunk):
            r = self.ref[s:s + chunk]
            m = self.blur(r)
            mus.append(m)
            vars_.append(self.blur(r * r) - m * m)
        self.mu = torch.cat(mus) if mus else self.ref.new_zeros((0,))
        self.var = torch.cat(vars_) if vars_ else self.ref.new_zeros((0,))

    def __len__(self) -> int:
        return int(self.ref.shape[0])

    def against(self, q: torch.Tensor, idx: torch.Tensor | None = None, chunk: int = 2048) -> torch.Tensor:
        """SSIM of one query image ``q`` (C,H,W) against reference rows ``idx`` (all when None)."""
        q = q.float().unsqueeze(0)
        mq = self.blur(q)
        vq = self.blur(q * q) - mq * mq
        rows = torch.arange(len(self)) if idx is None else idx
        out = []
        for s in range(0, len(rows), chunk):
            r = rows[s:s + chunk]
            ref, mr, vr = self.ref[r], self.mu[r], self.var[r]
            sxy = self.blur(q * ref) - mq * mr
            num = (2 * mq * mr + SSIM_C1) * (2 * sxy + SSIM_C2)
            den = (mq * mq + mr * mr + SSIM_C1) * (vq + vr + SSIM_C2)
            out.append((num / den).flatten(1).mean(1))
        return torch.cat(out) if out else torch.zeros(0)


def normalised_l2_matrix(a: torch.Tensor, b: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """All-pairs normalised L2 (RMS pixel difference), shape (len(a), len(b))."""
    a2 = a.flatten(1).double()
    b2 = b.flatten(1).double()
    d = a2.shape[1]
    bn = (b2 * b2).sum(1)
    rows = []
    for s in range(0, len(a2), chunk):
        q = a2[s:s + chunk]
        sq = (q * q).sum(1, keepdim=True) + bn.unsqueeze(0) - 2.0 * q @ b2.T
        rows.append(sq.clamp_min_(0.0).div_(d).sqrt_().float())
    return torch.cat(rows) if rows else torch.zeros((0, len(b2)))


def cosine_distance_matrix(fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """All-pairs ``1 - cosine similarity`` between feature rows, shape (len(fa), len(fb))."""
    na = F.normalize(fa.double(), dim=1)
    nb = F.normalize(fb.double(), dim=1)
    return (1.0 - na @ nb.T).clamp_min_(0.0).float()
