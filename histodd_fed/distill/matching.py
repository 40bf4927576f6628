"""Gradient matching: distances between real and synthetic gradients, and the per-class loss."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from histodd_fed.errors import ConfigError


def layer_distance(g_real: torch.Tensor, g_syn: torch.Tensor, distance: str) -> torch.Tensor:
    """Distance between one layer's real and synthetic weight gradients.

    - ``l1``: sum of absolute differences (Histo-DD's L1 as a plain sum; its scale grows with the
      layer size, so the image learning rate must be tiny, ~1e-3)
    - ``l1_mean``: mean absolute difference per layer (normalised L1; summed over layers). Scale-free
      in the layer size, so DC-like image learning rates (0.1-1) work
    - ``mse``: sum of squared differences
    - ``cosine``: DC's layer-wise distance, ``sum_j (1 - cos(g_real[j], g_syn[j]))`` over output
      units ``j`` (each filter's gradient flattened)
    """
    if distance == "l1":
        return (g_real - g_syn).abs().sum()
    if distance == "l1_mean":
        return (g_real - g_syn).abs().mean()
    if distance == "mse":
        return (g_real - g_syn).pow(2).sum()
    if distance == "cosine":
        a = g_real.reshape(g_real.shape[0], -1)
        b = g_syn.reshape(g_syn.shape[0], -1)
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-6)
        return (1 - cos).sum()
    raise ConfigError(f"unknown gradient distance {distance!r} (l1|l1_mean|cosine|mse)")


def gradient_distance(g_real: Sequence[torch.Tensor], g_syn: Sequence[torch.Tensor], distance: str) -> torch.Tensor:
    """Sum over layers of :func:`layer_distance`."""
    return sum(layer_distance(a, b, distance) for a, b in zip(g_real, g_syn))


def class_matching_loss(model: torch.nn.Module, weights: Sequence[torch.nn.Parameter], x_real: torch.Tensor,
                        y_real: torch.Tensor, x_syn: torch.Tensor, y_syn: torch.Tensor, distance: str) -> torch.Tensor:
    """Dis(grad CE(real), grad CE(syn)) for one class; differentiable w.r.t. ``x_syn``."""
    loss_r = F.cross_entropy(model(x_real), y_real)
    g_real = [g.detach() for g in torch.autograd.grad(loss_r, weights)]
    loss_s = F.cross_entropy(model(x_syn), y_syn)
    g_syn = torch.autograd.grad(loss_s, weights, create_graph=True)
    return gradient_distance(g_real, g_syn, distance)
