"""CLAM-SB: clustering-constrained attention MIL, single attention branch (Lu et al., Nat. BME 2021).

Gated attention pools the embedded instances into a slide embedding for the bag classifier. For
the slide's true class an instance classifier (one binary linear layer per class) is trained to
call the ``k`` most attended instances positive and the ``k`` least attended negative (a smooth
SVM or cross-entropy loss on pseudo labels); with ``subtyping`` the other classes' classifiers
also learn to call the top-``k`` instances negative. Total loss:
``bag_weight * CE(bag) + (1 - bag_weight) * instance loss``.

Bags smaller than ``2 k`` use ``k = N // 2``; a one-instance bag has no instance loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from histodd_fed.mil.abmil import GatedAttention
from histodd_fed.mil.registry import as_bag, register_mil


class CLAMSB(nn.Module):
    """CLAM single-branch head: bag (N, D) -> logits (1, C), attention (N,), instance loss."""

    def __init__(self, *, in_dim: int, num_classes: int = 2, hidden: int = 128, attn_dim: int = 64,
                 dropout: float = 0.25, k_sample: int = 8, bag_weight: float = 0.7,
                 subtyping: bool = False):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(hidden, attn_dim, 1, dropout)
        self.classifier = nn.Linear(hidden, num_classes)
        self.instance_classifiers = nn.ModuleList([nn.Linear(hidden, 2) for _ in range(num_classes)])
        self.k_sample = int(k_sample)
        self.bag_weight = float(bag_weight)
        self.subtyping = bool(subtyping)
        self.num_classes = num_classes

    def forward(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed(as_bag(bag))
        a = torch.softmax(self.attention(h)[:, 0], dim=0)
        z = a @ h
        return {"logits": self.classifier(z)[None], "attention": a, "embedding": z, "instances": h}

    def effective_k(self, n: int) -> int:
        """Instances per side of the clustering loss for a bag of ``n``: ``min(k, n // 2)``."""
        return min(self.k_sample, n // 2)

    def instance_loss(self, out: dict[str, torch.Tensor], label: int) -> torch.Tensor:
        """Clustering loss of the instance classifiers on top-k / bottom-k attended instances."""
        h, a = out["instances"], out["attention"]
        k = self.effective_k(h.shape[0])
        if k == 0:
            return h.new_zeros(())
        order = torch.argsort(a, descending=True)
        top, bottom = order[:k], order[-k:]
        losses = []
        for c, clf in enumerate(self.instance_classifiers):
            if c == label:  # in-class: top attended positive, least attended negative
                x = torch.cat([h[top], h[bottom]])
                t = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
            elif self.subtyping:  # out-of-class: the top attended are not class c
                x = h[top]
                t = torch.zeros(k, dtype=torch.long, device=h.device)
            else:
                continue
            losses.append(F.cross_entropy(clf(x), t))
        return torch.stack(losses).mean()

    def loss(self, out: dict[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        bag_loss = F.cross_entropy(out["logits"], label.view(1))
        inst = self.instance_loss(out, int(label))
        return self.bag_weight * bag_loss + (1.0 - self.bag_weight) * inst


@register_mil("clam")
def _clam(**kw) -> CLAMSB:
    return CLAMSB(**kw)
