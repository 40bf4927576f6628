"""Model augmentation (Histo-DD / IDC-style): perturb each filter by a norm-scaled Gaussian.

For every filter ``j`` of every convolution or linear layer ``l``: ``d ~ N(0, I)``,
``d_lj <- d_lj / ||d_lj||_F * ||w_lj||_F`` and ``w_lj <- w_lj + alpha * d_lj``. Biases and
normalisation parameters are left untouched.
"""

from __future__ import annotations

import torch
from torch import nn

CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
WEIGHT_LAYERS = CONV_LAYERS + (nn.Linear,)


def matched_weights(model: nn.Module, fc: bool = True) -> list[nn.Parameter]:
    """The weights of the conv / linear layers, in module order (the ones matched and perturbed).

    ``fc=False`` leaves the fully-connected (``nn.Linear``: the classifier) weights out - what the
    matching uses with ``match_fc: false``; model augmentation always perturbs them all."""
    layers = WEIGHT_LAYERS if fc else CONV_LAYERS
    return [m.weight for m in model.modules() if isinstance(m, layers)]


@torch.no_grad()
def augment_model(model: nn.Module, alpha: float, generator: torch.Generator) -> nn.Module:
    """Perturb ``model`` in place (see module docstring); returns it. ``alpha == 0`` is a no-op."""
    if alpha == 0:
        return model
    for w in matched_weights(model):
        d = torch.randn(w.shape, generator=generator).to(w.device, w.dtype)
        dims = tuple(range(1, w.dim()))
        d_norm = d.pow(2).sum(dim=dims, keepdim=True).sqrt().clamp(min=1e-12)
        w_norm = w.pow(2).sum(dim=dims, keepdim=True).sqrt()
        w.add_(alpha * d / d_norm * w_norm)
    return model
