"""DSMIL: dual-stream MIL (Li, Li, Eliceiri, CVPR 2021).

Stream 1 (max pooling): an instance classifier scores every instance; the bag score of class
``c`` is the maximum instance score, and the argmax instance is class ``c``'s *critical instance*.
Stream 2 (attention from the critical instance): queries ``q_i = q(h_i)``; the attention of
instance ``i`` for class ``c`` is ``softmax_i( <q_i, q_{m_c}> / sqrt(d_q) )``; the class-wise bag
embeddings ``b_c = sum_i A_ic v(h_i)`` go through a 1-D convolution spanning the embedding (one
output per class). Loss ``0.5 * CE(stream 2) + 0.5 * CE(stream 1)``; the reported logits are the
mean of both streams.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from histodd_fed.mil.registry import as_bag, register_mil


class DSMIL(nn.Module):
    """Dual-stream MIL head: bag (N, D) -> logits (1, C), attention (C, N), both streams' logits."""

    def __init__(self, *, in_dim: int, num_classes: int = 2, hidden: int = 128, q_dim: int = 64,
                 dropout: float = 0.0, passing_v: bool = True, max_weight: float = 0.5):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())
        self.instance_classifier = nn.Linear(hidden, num_classes)
        self.q = nn.Sequential(nn.Linear(hidden, q_dim), nn.ReLU(), nn.Linear(q_dim, q_dim), nn.Tanh())
        self.v = (nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU())
                  if passing_v else nn.Identity())
        self.fcc = nn.Conv1d(num_classes, num_classes, kernel_size=hidden)
        self.q_dim = q_dim
        self.max_weight = float(max_weight)

    def forward(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed(as_bag(bag))                        # (N, L)
        inst = self.instance_classifier(h)                 # (N, C)
        max_logits, critical = inst.max(dim=0)             # (C,), (C,)
        Q = self.q(h)                                      # (N, dq)
        q_crit = Q[critical]                               # (C, dq) (critical rows of the same map)
        A = torch.softmax(Q @ q_crit.T / math.sqrt(self.q_dim), dim=0)  # (N, C), sums to 1 over N
        B = A.T @ self.v(h)                                # (C, L)
        bag_logits = self.fcc(B[None]).view(1, -1)         # (1, C)
        logits = 0.5 * (bag_logits + max_logits[None])
        return {"logits": logits, "attention": A.T, "bag_logits": bag_logits,
                "max_logits": max_logits[None], "instance_logits": inst, "critical": critical}

    def loss(self, out: dict[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        y = label.view(1)
        return ((1.0 - self.max_weight) * F.cross_entropy(out["bag_logits"], y)
                + self.max_weight * F.cross_entropy(out["max_logits"], y))


@register_mil("dsmil")
def _dsmil(**kw) -> DSMIL:
    return DSMIL(**kw)
