"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021) plus stain operations.

Every operation is differentiable with respect to the images. Parameters are drawn first
(:meth:`Augmentation.sample`) from an explicit ``torch.Generator`` and then applied
(:meth:`Augmentation.apply`), so the *same* draw can be applied to a real and a synthetic batch
("siamese"). With ``siamese=True`` one parameter set is drawn and shared by every image of both
batches, as in DSA; with ``siamese=False`` each image gets its own draw (classifier training).

Operations (names used in strategy strings, joined by ``_``):

- ``stain``: normalise toward the template stains (Macenko, matrix products only), deterministic
- ``stainmatrix``: swap each image's stain vectors for the template's but keep its concentrations
  (no per-image max-concentration rescaling, so darker nuclei stay darker), deterministic
- ``stainjitter``: multiply/shift the H and E concentrations by small random factors
- ``color``: brightness, saturation and contrast
- ``crop``: random translation (zero-padded crop) of up to 1/8 of the size
- ``cutout``: a square of half the size replaced by the image mean
- ``flip``: horizontal flip with probability 1/2
- ``scale``: independent x/y scaling in [1/1.2, 1.2]
- ``rotate``: rotation in [-15, 15] degrees

Stain operations run first (they need the original pixels the stain matrices were estimated on),
the rest in the order DSA uses: color, crop, cutout, flip, scale, rotate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from histodd_fed.errors import ConfigError
from histodd_fed.stain.normalize import ImageStains, StainContext, jitter_stain, normalize_stain

ORDER = ("stain", "stainmatrix", "stainjitter", "color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass(frozen=True)
class DSAParams:
    """Ranges of the DSA draws (defaults from DSA, colour ranges rescaled to [0, 1] images)."""

    brightness: float = 0.125     #: additive shift in [-b, b]
    saturation: float = 2.0       #: saturation factor in [0, s]
    contrast: float = 0.5         #: contrast factor in [1 - c, 1 + c]
    crop_pad: float = 0.125       #: translation up to this fraction of the size
    cutout: float = 0.5           #: cutout square side as a fraction of the size
    scale: float = 1.2            #: scale factors in [1/s, s]
    rotate_deg: float = 15.0
    stain_jitter: float = 0.1     #: concentration factors in [1-j, 1+j], shifts in [-j/2, j/2]


def parse_strategy(strategy: str | None) -> tuple[str, ...]:
    """``"color_crop_..."`` -> ops in application order; ``""``/``"none"`` -> ()."""
    if not strategy or strategy.lower() == "none":
        return ()
    ops = [p for p in strategy.lower().split("_") if p]
    unknown = [p for p in ops if p not in ORDER]
    if unknown:
        raise ConfigError(f"augmentation strategy {strategy!r}: unknown operation(s) {unknown}; known: {list(ORDER)}")
    return tuple(op for op in ORDER if op in ops)


@dataclass
class AugDraw:
    """One draw of augmentation parameters (tensors with a leading dim of 1 or the batch size)."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    siamese: bool = True


def _u(n: int, gen: torch.Generator, lo: float, hi: float, *shape: int) -> torch.Tensor:
    return torch.rand((n, *shape), generator=gen) * (hi - lo) + lo


class Augmentation:
    """A DSA augmentation pipeline; call ``aug(x, generator)`` or ``aug.apply(x, aug.sample(...))``."""

    def __init__(self, strategy: str | None, stain: StainContext | None = None, params: DSAParams = DSAParams()) -> None:
        self.ops = parse_strategy(strategy)
        self.strategy = "_".join(self.ops) if self.ops else "none"
        self.params = params
        self.stain = stain
        for op in ("stain", "stainmatrix"):
            if op in self.ops and stain is None:
                raise ConfigError(f"augmentation {strategy!r}: {op!r} needs a StainContext (template)")

    @property
    def uses_stains(self) -> bool:
        return any(op in self.ops for op in ("stain", "stainmatrix", "stainjitter"))

    def __repr__(self) -> str:
        return f"Augmentation({self.strategy!r})"

    # ------------------------------------------------------------------ draws
    def sample(self, batch_size: int, generator: torch.Generator, siamese: bool = True) -> AugDraw:
        """Draw parameters for ``batch_size`` images (one shared draw when ``siamese``)."""
        n = 1 if siamese else batch_size
        p, g, v = self.params, generator, {}
        for op in self.ops:  # fixed order -> reproducible draws
            if op == "stainjitter":
                v["sj_alpha"] = _u(n, g, 1 - p.stain_jitter, 1 + p.stain_jitter, 2)
                v["sj_beta"] = _u(n, g, -p.stain_jitter / 2, p.stain_jitter / 2, 2)
            elif op == "color":
                v["brightness"] = _u(n, g, -p.brightness, p.brightness)
                v["saturation"] = _u(n, g, 0.0, p.saturation)
                v["contrast"] = _u(n, g, 1 - p.contrast, 1 + p.contrast)
            elif op == "crop":
                v["crop"] = _u(n, g, -p.crop_pad, p.crop_pad, 2)
            elif op == "cutout":
                v["cutout"] = _u(n, g, 0.0, 1.0, 2)
            elif op == "flip":
                v["flip"] = (torch.rand(n, generator=g) < 0.5).float()
            elif op == "scale":
                v["scale"] = _u(n, g, 1.0 / p.scale, p.scale, 2)
            elif op == "rotate":
                v["rotate"] = _u(n, g, -p.rotate_deg, p.rotate_deg) * (math.pi / 180.0)
        return AugDraw(v, siamese)

    # ------------------------------------------------------------------ apply
    def apply(self, x: torch.Tensor, draw: AugDraw, stains: ImageStains | None = None) -> torch.Tensor:
        """Apply ``draw`` to ``x`` (B, 3, H, W) in [0, 1]; ``stains`` are the images' own stains.

        When a stain operation is in the strategy and ``stains`` is None, they are estimated from
        ``x`` without gradient (fine for classifier training; distillation precomputes them).
        """
        if not self.ops:
            return x
        v = {k: t.to(x.device) for k, t in draw.values.items()}
        if self.uses_stains and stains is None:
            stains = ImageStains.from_tensor(x)
        for op in self.ops:
            if op in ("stain", "stainmatrix"):
                x = normalize_stain(x, stains, self.stain, rescale=op == "stain")
            elif op == "stainjitter":
                normalised = "stain" in self.ops or "stainmatrix" in self.ops
                x = jitter_stain(x, _template_stains(self.stain, x) if normalised else stains, v["sj_alpha"], v["sj_beta"])
            elif op == "color":
                x = x + v["brightness"].view(-1, 1, 1, 1)
                m = x.mean(dim=1, keepdim=True)
                x = (x - m) * v["saturation"].view(-1, 1, 1, 1) + m
                m = x.mean(dim=(1, 2, 3), keepdim=True)
                x = (x - m) * v["contrast"].view(-1, 1, 1, 1) + m
            elif op == "crop":
                x = _affine(x, _matrix(x, tx=v["crop"][:, 0] * 2, ty=v["crop"][:, 1] * 2))
            elif op == "cutout":
                x = _cutout(x, v["cutout"], self.params.cutout)
            elif op == "flip":
                f = v["flip"].view(-1, 1, 1, 1)
                x = f * x.flip(3) + (1 - f) * x
            elif op == "scale":
                x = _affine(x, _matrix(x, sx=v["scale"][:, 0], sy=v["scale"][:, 1]))
            elif op == "rotate":
                x = _affine(x, _matrix(x, rot=v["rotate"]))
        return x

    def __call__(self, x: torch.Tensor, generator: torch.Generator, stains: ImageStains | None = None,
                 siamese: bool = False) -> torch.Tensor:
        """Augment ``x`` with a fresh draw from ``generator`` (per-image unless ``siamese``)."""
        return self.apply(x, self.sample(x.shape[0], generator, siamese=siamese), stains)


def _template_stains(ctx: StainContext, x: torch.Tensor) -> ImageStains:
    b = x.shape[0]
    return ImageStains(ctx.template_matrix.to(x).expand(b, 3, 2), ctx.template_max_conc.to(x).expand(b, 2))


def _matrix(x: torch.Tensor, sx=None, sy=None, rot=None, tx=None, ty=None) -> torch.Tensor:
    """Affine matrices (n, 2, 3) for grid_sample (n = 1 or batch)."""
    n = max(t.shape[0] for t in (sx, sy, rot, tx, ty) if t is not None)
    one, zero = torch.ones(n, device=x.device), torch.zeros(n, device=x.device)
    sx = one if sx is None else sx
    sy = one if sy is None else sy
    tx = zero if tx is None else tx
    ty = zero if ty is None else ty
    c, s = (one, zero) if rot is None else (torch.cos(rot), torch.sin(rot))
    row0 = torch.stack([sx * c, -sx * s, tx], dim=-1)
    row1 = torch.stack([sy * s, sy * c, ty], dim=-1)
    return torch.stack([row0, row1], dim=1)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    theta = theta.to(x.dtype).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _cutout(x: torch.Tensor, centre: torch.Tensor, ratio: float) -> torch.Tensor:
    b, _, h, w = x.shape
    ch, cw = max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5))
    cy = (centre[:, 0] * (h + 1 - ch % 2)).long() - ch // 2   # top-left, may start off-image
    cx = (centre[:, 1] * (w + 1 - cw % 2)).long() - cw // 2
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((ys >= cy.view(-1, 1, 1)) & (ys < (cy + ch).view(-1, 1, 1))
              & (xs >= cx.view(-1, 1, 1)) & (xs < (cx + cw).view(-1, 1, 1)))
    keep = (~inside).to(x.dtype).unsqueeze(1)                      # (n, 1, H, W)
    fill = x.mean(dim=(1, 2, 3), keepdim=True).detach()
    return x * keep + fill * (1 - keep)
