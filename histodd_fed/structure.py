"""Structure vectors of images (zero-mean, unit-norm low-passed grey): a leaf shared by the distillation's
privacy term and the privacy audit, so neither imports the other."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def structure_vectors(x: torch.Tensor, pool: int) -> torch.Tensor:
    """Zero-mean, unit-norm rows of the low-passed grey images: ``structure_vectors(a) @ structure_vectors(b).T``
    is the all-pairs structure correlation (flat images score 0)."""
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1).double()
    if pool > 1 and min(grey.shape[-2:]) >= 2 * pool:
        grey = F.avg_pool2d(grey, pool)
    g = grey.flatten(1)
    g = g - g.mean(1, keepdim=True)
    return g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
