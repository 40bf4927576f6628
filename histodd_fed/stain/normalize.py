"""Differentiable stain normalisation and stain jitter (torch), for use inside augmentation.

Offline, each image gets a Macenko stain matrix ``M_i`` (3, 2) and max concentrations ``m_i``
(2,) (:mod:`histodd_fed.stain.macenko`). Online, only matrix products are used:

    OD  = -log((255 x + 1) / 256)            x in [0, 1], (B, 3, H, W)
    C   = pinv(M_i) OD                        per-image concentrations (B, 2, HW)
    C'  = C * m_T / m_i                       rescale to the template's max concentrations
    OD' = M_T C'                              template stains
    x'  = (256 exp(-OD') - 1) / 255

so gradients flow from ``x'`` back to ``x`` (and to a synthetic image being optimised).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from histodd_fed.stain import macenko


@dataclass
class ImageStains:
    """Per-image stain matrices (B, 3, 2) and max concentrations (B, 2), float tensors."""

    matrices: torch.Tensor
    max_conc: torch.Tensor

    def index(self, idx) -> "ImageStains":
        return ImageStains(self.matrices[idx], self.max_conc[idx])

    def to(self, device) -> "ImageStains":
        return ImageStains(self.matrices.to(device), self.max_conc.to(device))

    @classmethod
    def estimate(cls, images_uint8: np.ndarray, params: macenko.MacenkoParams = macenko.MacenkoParams()) -> "ImageStains":
        """Macenko estimate for uint8 NHWC images (reference stains for background patches)."""
        mats, maxc, _ = macenko.estimate_stains(images_uint8, params)
        return cls(torch.from_numpy(mats), torch.from_numpy(maxc))

    @classmethod
    def from_tensor(cls, x: torch.Tensor) -> "ImageStains":
        """Estimate (without gradient) from float NCHW images in [0, 1]."""
        arr = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return cls.estimate(arr).to(x.device)


@dataclass
class StainContext:
    """The template the data are normalised toward: stain matrix (3, 2) and max concentrations (2,)."""

    template_matrix: torch.Tensor
    template_max_conc: torch.Tensor
    template_index: int = -1

    @classmethod
    def from_images(cls, images_uint8: np.ndarray, params: macenko.MacenkoParams = macenko.MacenkoParams()) -> "StainContext":
        """Choose the template image (mean/std closest to the set's) and take its Macenko stains."""
        i = macenko.choose_template(images_uint8, params)
        m, est = macenko.stain_matrix(images_uint8[i], params)
        mx = macenko.max_concentrations(images_uint8[i], m, params, est)
        return cls(torch.tensor(m, dtype=torch.float32), torch.tensor(mx, dtype=torch.float32), i)

    @classmethod
    def reference(cls) -> "StainContext":
        return cls(torch.tensor(macenko.REFERENCE_STAINS, dtype=torch.float32),
                   torch.tensor(macenko.REFERENCE_MAX_CONC, dtype=torch.float32), -1)

    def to_dict(self) -> dict:
        return {"template_matrix": self.template_matrix.tolist(), "template_max_conc": self.template_max_conc.tolist(),
                "template_index": self.template_index}


def rgb_to_od(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] float RGB -> optical density (same shape); smooth and finite everywhere."""
    return -torch.log((x.clamp(min=0.0) * macenko.IO + 1.0) / (macenko.IO + 1.0))


def od_to_rgb(od: torch.Tensor) -> torch.Tensor:
    return ((macenko.IO + 1.0) * torch.exp(-od) - 1.0) / macenko.IO


def _concentrations(x: torch.Tensor, stains: ImageStains) -> torch.Tensor:
    b, _, h, w = x.shape
    od = rgb_to_od(x).reshape(b, 3, h * w)
    pinv = torch.linalg.pinv(stains.matrices.to(x.dtype))          # (B, 2, 3)
    return pinv @ od                                                 # (B, 2, HW)


def _compose(conc: torch.Tensor, matrix: torch.Tensor, shape) -> torch.Tensor:
    # OD < 0 is brighter than white and clamped to 1 below anyway; clamping here keeps exp() finite so
    # the backward pass has no 0 * inf = NaN (the `stain` op hit it: scaled concentrations overflowed)
    od = (matrix.to(conc.dtype) @ conc).clamp(min=0.0)               # (B, 3, HW)
    return od_to_rgb(od).reshape(shape)


def normalize_stain(x: torch.Tensor, stains: ImageStains, ctx: StainContext, rescale: bool = True) -> torch.Tensor:
    """Map images ``x`` (B, 3, H, W) in [0, 1] with stains ``stains`` onto the template's stains.

    ``rescale=True`` (Macenko): each image's concentrations are scaled so its 99th-percentile
    concentration matches the template's, which also equalises how dark the darkest nuclei are
    across images. ``rescale=False``: only the stain vectors are swapped for the template's and the
    concentrations are kept, so relative darkness between images survives.
    """
    conc = _concentrations(x, stains)
    if rescale:
        conc = conc * (ctx.template_max_conc.to(x) / stains.max_conc.to(x).clamp(min=1e-3)).unsqueeze(-1)
    tm = ctx.template_matrix.to(x).expand(x.shape[0], 3, 2)
    return _compose(conc, tm, x.shape).clamp(0.0, 1.0)


def jitter_stain(x: torch.Tensor, stains: ImageStains, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Perturb concentrations: ``C' = C * alpha + beta`` with per-stain (B or 1, 2) factors."""
    conc = _concentrations(x, stains)
    conc = conc * alpha.unsqueeze(-1).to(x) + beta.unsqueeze(-1).to(x)
    return _compose(conc, stains.matrices.to(x), x.shape).clamp(0.0, 1.0)
