"""ABMIL: attention-based deep MIL with gated attention (Ilse, Tomczak, Welling, ICML 2018).

Instances ``h_k`` (after a linear + ReLU embedding) are pooled as ``z = sum_k a_k h_k`` with

    a_k = softmax_k( w^T ( tanh(V h_k) * sigmoid(U h_k) ) )

and a linear classifier on ``z`` gives the bag logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from histodd_fed.mil.registry import as_bag, register_mil


class GatedAttention(nn.Module):
    """Gated attention scores: ``w^T (tanh(V h) * sigmoid(U h))``, one score per branch.

    Returns raw scores (N, n_branches); the caller applies the softmax over instances.
    """

    def __init__(self, dim: int, attn_dim: int, n_branches: int = 1, dropout: float = 0.0):
        super().__init__()
        self.V = nn.Linear(dim, attn_dim)
        self.U = nn.Linear(dim, attn_dim)
        self.w = nn.Linear(attn_dim, n_branches)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w(self.drop(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))))


class ABMIL(nn.Module):
    """Gated-attention MIL head: bag (N, D) -> logits (1, C), attention (N,)."""

    def __init__(self, *, in_dim: int, num_classes: int = 2, hidden: int = 128, attn_dim: int = 64,
                 dropout: float = 0.25):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(hidden, attn_dim, 1, dropout)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed(as_bag(bag))                       # (N, L)
        a = torch.softmax(self.attention(h)[:, 0], dim=0)  # (N,)
        z = a @ h                                          # (L,)
        return {"logits": self.classifier(z)[None], "attention": a, "embedding": z}

    def loss(self, out: dict[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        """Bag cross-entropy."""
        return F.cross_entropy(out["logits"], label.view(1))


@register_mil("abmil")
def _abmil(**kw) -> ABMIL:
    return ABMIL(**kw)
