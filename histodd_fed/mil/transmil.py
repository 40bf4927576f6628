"""TransMIL: transformer-based correlated MIL (Shao et al., NeurIPS 2021), CPU friendly.

Instances are embedded (linear + ReLU), padded to a square count ``H*H`` by repeating the first
instances, prefixed with a learnable class token, and passed through

    TransLayer -> PPEG -> TransLayer -> LayerNorm -> class token -> linear classifier.

``TransLayer`` is ``x + NystromAttention(LayerNorm(x))``. ``NystromAttention`` (Xiong et al.,
AAAI 2021) approximates ``softmax(Q K^T) V`` by ``softmax(Q K~^T) pinv(softmax(Q~ K~^T))
softmax(Q~ K^T) V`` with landmarks ``Q~, K~`` the means of consecutive segments of the sequence
(front-padded with zeros to a multiple of the landmark count) and the Moore-Penrose pseudo
inverse by the iterative scheme of Razavi et al.; plus a depth-wise convolution residual on V.
``PPEG`` reshapes the instance tokens to the H x H grid and adds depth-wise 7x7, 5x5 and 3x3
convolutions (conditional positional encoding).

The returned ``attention`` (N,) is the exact softmax attention of the class token's query over the
real instances' keys in the last layer, averaged over heads and renormalised over the N instances
(TransMIL has no attention pooling of its own; this is the usual way to show where it looks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from histodd_fed.mil.registry import as_bag, register_mil


def moore_penrose_pinv(x: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Iterative Moore-Penrose pseudo inverse of a batch of square matrices (..., m, m).

    ``Z_0 = X^T / (max_j sum_i |x_ij| * max_i sum_j |x_ij|)``;
    ``Z_{k+1} = 1/4 Z_k (13 I - X Z_k (15 I - X Z_k (7 I - X Z_k)))``.
    """
    abs_x = x.abs()
    col = abs_x.sum(dim=-1)
    row = abs_x.sum(dim=-2)
    z = x.transpose(-1, -2) / (col.amax(dim=-1) * row.amax(dim=-1))[..., None, None]
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head Nystrom self-attention over a sequence (B, n, dim) -> (B, n, dim)."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int | None = None, num_landmarks: int = 32,
                 pinv_iters: int = 6, residual_kernel: int = 33, dropout: float = 0.1):
        super().__init__()
        dim_head = dim_head or dim // heads
        inner = heads * dim_head
        self.heads, self.dim_head, self.m, self.pinv_iters = heads, dim_head, num_landmarks, pinv_iters
        self.scale = dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0),
                                  groups=heads, bias=False)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        shape = (b, n, self.heads, self.dim_head)
        return tuple(t.reshape(shape).transpose(1, 2) for t in (q, k, v))  # (b, h, n, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        m = self.m
        pad = (m - n % m) % m
        if pad:  # front-pad with zero tokens so the sequence splits into m equal segments
            x = F.pad(x, (0, 0, pad, 0))
        q, k, v = self.qkv(x)
        q = q * self.scale
        seg = x.shape[1] // m
        q_l = q.reshape(b, self.heads, m, seg, self.dim_head).mean(dim=-2)  # landmarks: segment means
        k_l = k.reshape(b, self.heads, m, seg, self.dim_head).mean(dim=-2)
        kernel_1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)          # (b,h,n,m)
        kernel_2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)        # (b,h,m,m)
        kernel_3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)          # (b,h,m,n)
        out = (kernel_1 @ moore_penrose_pinv(kernel_2, self.pinv_iters)) @ (kernel_3 @ v)
        out = out + self.res_conv(v)
        out = out.transpose(1, 2).reshape(b, x.shape[1], self.heads * self.dim_head)
        return self.to_out(out)[:, -n:]  # drop the front padding

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Exact softmax attention of token 0's query over all tokens, mean over heads: (B, n)."""
        q, k, _ = self.qkv(x)
        scores = (q[:, :, :1] * self.scale) @ k.transpose(-1, -2)  # (b, h, 1, n)
        return torch.softmax(scores, dim=-1).mean(dim=1)[:, 0]


class TransLayer(nn.Module):
    """Pre-norm residual Nystrom attention block."""

    def __init__(self, dim: int, heads: int, num_landmarks: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads=heads, num_landmarks=num_landmarks, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm(x))

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn.cls_attention(self.norm(x))


class PPEG(nn.Module):
    """Pyramid position encoding generator on the square token grid (class token passed through)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        b, _, c = x.shape
        cls, feat = x[:, :1], x[:, 1:]
        grid = feat.transpose(1, 2).reshape(b, c, side, side)
        grid = grid + self.proj7(grid) + self.proj5(grid) + self.proj3(grid)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(nn.Module):
    """TransMIL head: bag (N, D) -> logits (1, C), attention (N,)."""

    def __init__(self, *, in_dim: int, num_classes: int = 2, hidden: int = 128, heads: int = 4,
                 num_landmarks: int | None = None, dropout: float = 0.1):
        super().__init__()
        landmarks = num_landmarks or max(hidden // 2, 1)
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        self.layer1 = TransLayer(hidden, heads, landmarks, dropout)
        self.ppeg = PPEG(hidden)
        self.layer2 = TransLayer(hidden, heads, landmarks, dropout)
        self.norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed(as_bag(bag))                         # (N, L)
        n = h.shape[0]
        side = math.ceil(math.sqrt(n))
        extra = side * side - n
        if extra:  # square-pad by repeating the first instances (cycled for tiny bags)
            h = torch.cat([h, h[torch.arange(extra, device=h.device) % n]])
        x = torch.cat([self.cls_token, h[None]], dim=1)     # (1, 1 + side^2, L)
        x = self.layer1(x)
        x = self.ppeg(x, side)
        attn = self.layer2.cls_attention(x)[0, 1:1 + n]      # class token -> real instances
        x = self.layer2(x)
        cls = self.norm(x)[:, 0]
        return {"logits": self.classifier(cls), "attention": attn / attn.sum(), "embedding": cls[0]}

    def loss(self, out: dict[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out["logits"], label.view(1))


@register_mil("transmil")
def _transmil(**kw) -> TransMIL:
    return TransMIL(**kw)
