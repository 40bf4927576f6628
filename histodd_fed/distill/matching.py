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


def stacked_layer_distance(g_real: torch.Tensor, g_syn: torch.Tensor, distance: str) -> torch.Tensor:
    """Sum over classes of :func:`layer_distance` for gradients stacked along a leading class dim (K, *w)."""
    k = g_real.shape[0]
    if distance == "l1_mean":
        return (g_real - g_syn).abs().sum() / (g_real.numel() // k)
    if distance == "cosine":  # per-filter rows of every class at once
        return layer_distance(g_real.reshape(k * g_real.shape[1], -1), g_syn.reshape(k * g_syn.shape[1], -1), distance)
    return layer_distance(g_real, g_syn, distance)


def functional_split(model: torch.nn.Module, weights: Sequence[torch.nn.Parameter]
                     ) -> tuple[list[str], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(names of ``weights`` in their order, every other parameter and buffer detached, the weights
    detached by name): the pieces ``torch.func.functional_call`` needs to differentiate w.r.t. ``weights``."""
    ids = {id(w) for w in weights}
    named = dict(model.named_parameters())
    order = {id(w): i for i, w in enumerate(weights)}
    w_names = sorted((n for n, p in named.items() if id(p) in ids), key=lambda n: order[id(named[n])])
    fixed = {n: p.detach() for n, p in named.items() if id(p) not in ids}
    fixed.update(dict(model.named_buffers()))
    return w_names, fixed, {n: named[n].detach() for n in w_names}


def batched_matching_loss(model: torch.nn.Module, weights: Sequence[torch.nn.Parameter], x_real: torch.Tensor,
                          y_real: torch.Tensor, x_syn: torch.Tensor, y_syn: torch.Tensor, distance: str,
                          per_class: str = "vmap") -> torch.Tensor:
    """Sum over classes of :func:`class_matching_loss` for class-stacked batches.

    ``x_real`` (K, B, 3, H, W) / ``y_real`` (K, B) hold every class's real batch, ``x_syn`` (K, m, 3, H, W) /
    ``y_syn`` (K, m) its synthetic images. The result is differentiable w.r.t. ``x_syn`` only (the
    weights are detached: no second-order gradient for the network is built).

    ``per_class="vmap"``: per-class weight gradients from ``torch.func`` - one ``vmap(grad(CE))`` over all
    real batches (no graph) and one over all synthetic images; no Python loop over classes. Best on GPUs
    (measured *slower* on CPU, where functorch's per-class conv weight gradients use grouped convolutions).
    ``per_class="loop"``: a loop over class slices with the same detached-weight gradients (CPU default).
    Both are exact (to float rounding) for networks whose layers act per sample (instance norm, no batch
    norm); see :func:`supports_batched_matching`. Distances are computed class-stacked per layer.
    """
    from torch.func import functional_call, grad, vmap

    w_names, fixed, w = functional_split(model, weights)

    def ce(wd: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, {**fixed, **wd}, (x,)), y)

    if per_class == "vmap":
        per_class_grad = vmap(grad(ce), in_dims=(None, 0, 0))
        with torch.no_grad():
            g_real = per_class_grad(w, x_real, y_real)
        g_syn = per_class_grad(w, x_syn, y_syn)
    elif per_class == "loop":
        wl = [t.requires_grad_(True) for t in w.values()]

        def grads(x: torch.Tensor, y: torch.Tensor, create_graph: bool) -> dict[str, torch.Tensor]:
            out = [torch.autograd.grad(ce(w, x[k], y[k]), wl, create_graph=create_graph) for k in range(x.shape[0])]
            return {n: torch.stack([o[i] for o in out]) for i, n in enumerate(w_names)}

        g_real = {n: g.detach() for n, g in grads(x_real, y_real, False).items()}
        g_syn = grads(x_syn, y_syn, True)
    else:
        raise ConfigError(f"per-class gradients: unknown mode {per_class!r} (vmap|loop)")
    return sum(stacked_layer_distance(g_real[n], g_syn[n], distance) for n in w_names)


def supports_batched_matching(model: torch.nn.Module) -> bool:
    """True when every layer acts per sample (batch norm would mix the classes of one batched forward)."""
    return not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
