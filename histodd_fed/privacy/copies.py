"""A copy detector that transforms cannot fool: is a synthetic image one real patch, or a few, in disguise?

The nearest-neighbour rules of :mod:`histodd_fed.privacy.risk` compare pixels where they stand: a real
patch rotated by 90 degrees, mirrored, shifted by a few pixels inside the raw patch or inverted in
colour is far from its source in SSIM, L2 and structure correlation, and passed them. This module
asks instead how much of a synthetic image one real patch (or a pixel mixture of up to
``max_mix`` of them) can *explain* after the transforms an attacker - or an optimiser - has for free:

- geometry: the 8 dihedral transforms (rotations by 90 degrees, mirror, transpose), and any
  translation of the view's window inside the raw patch it was cut from (at the view's scale: a
  centre crop can move anywhere in the 96-px patch; a resize-only view by the template margin), plus
  shifts that leave up to ``margin_frac`` of the image outside (rolled or padded copies);
- colour: a free affine map of the real window's three RGB channels onto the synthetic image's grey
  (inversion, brightness / contrast, grey, channel order are exactly such maps; gamma and a
  re-staining to another H&E stain are close to one);
- degradation: both images are low-passed (gaussian, ``blur_sigma`` px) before comparing, so pixel
  noise and JPEG artefacts move little; a blurred copy is also compared with the real window blurred by
  ``extra_blur`` px.

The statistic is the explained variance R^2 of the synthetic image's low-passed grey (its central
part for the copy search, all of it for mixtures) by the best such explanation:

1. **copy**: one real window (any raw patch, any position, any dihedral transform, the affine RGB
   colour map). Searched exhaustively at a coarse stride by normalised cross-correlation (a
   convolution over all real patches, batched), the ``topk`` best windows per transformed image
   refined at full resolution;
2. **mixture**: orthogonal matching pursuit over the real patches in the view (each in any of the 8
   dihedral transforms), up to ``max_mix`` atoms and a constant; R^2 of the least-squares fit.

A high R^2 alone does not make a copy: a smooth natural image (another slide's patch, a public tile) is
explained almost as well by many unrelated real patches (best 0.92, 8th best 0.91), while a disguised copy
is explained by its source - and the source's duplicates - and by nothing else (JPEG q50: best 0.89, 8th
best 0.18). So an image is flagged when

- its R^2 reaches ``threshold`` (a near-exact explanation, whatever else explains it), or
- its best single real window explains it with R^2 >= ``unique_floor`` and *stands out from chance*: the
  variance that window leaves is at most ``unique_ratio`` times the variance left by the image's
  ``uniqueness_rank``-th best distinct real patch (the chance level: how well unrelated tissue explains this
  very image). Mixtures are judged by ``threshold`` only: a natural image's fit by 4 atoms has no
  like-for-like chance level here.

Each image is judged on its own, in each audited view, and reported with its real source(s), transform,
R^2 and the rule that flagged it, so copies cannot hide behind the rest of the set. No number is derived
from the set or the recipe. Images whose low-passed grey varies less than ``bland_std`` (background, fat)
are *bland*: no layout to identify them by, so this rule skips them (an exact copy of a bland patch still
meets the L2 / SSIM rules).

The rule was chosen on one split of attacks and held-out images and measured on another
(``benchmarks/experiments/copy_uniqueness.py``); ``benchmarks/bench_copy_detector.py`` re-measures every attack,
the false-flag rate on real held-out patches and the speed (docs/privacy.md, "Copy detector"). The optimiser never reads
this rule: neither the distillation objective (its privacy term uses the structure / L2 statistics)
nor the candidate choice consults it (docs/privacy.md, "Which rules are independent").
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from histodd_fed.errors import ConfigError, InputError
from histodd_fed.image_similarity import band_matrix
from histodd_fed.preprocess import ViewSpec, apply_view_images, resize_images

log = logging.getLogger(__name__)

RANKED_KEEP = 16         #: distinct real patches whose copy R^2 each finding records
COARSE_BYTES = 1 << 30   #: memory the coarse search's correlation maps may take (bytes)

DIHEDRAL_NAMES = ("identity", "rot90", "rot180", "rot270", "mirror", "rot90+mirror", "rot180+mirror", "rot270+mirror")


@dataclass
class CopyDetectorConfig:
    """Knobs of :func:`detect_copies` (``configs/privacy.yaml``, section ``copies``)."""

    enabled: bool = True
    threshold: float = 0.97       #: flag an image whose R^2 (copy or mixture) reaches this, whatever chance reaches
    unique_floor: float = 0.75    #: from this R^2 on, flag an image whose best explanation stands out from chance:
    unique_ratio: float = 0.5     #: its unexplained variance <= this x that left by its uniqueness_rank-th best real patch
    blur_sigma: float = 0.5       #: gaussian low-pass (px at the view's scale) before comparing
    extra_blur: float = 1.0       #: the copy's refine also tries the real window blurred by this (blurred copies)
    margin_frac: float = 0.125    #: copy search uses the image minus this border (shifted / padded copies)
    coarse_template: int = 12     #: the coarse search works at a stride that leaves a template of ~this many px
    topk: int = 24                #: coarse candidates refined per transformed image
    max_mix: int = 4              #: atoms of the mixture search
    bland_std: float = 0.03       #: images with low-passed grey std below this are bland (skipped)
    var_floor: float = 0.05       #: times the template's variance, added to window variances (flat windows correlate weakly)
    chunk: int = 256              #: real patches per batch of the coarse search
    uniqueness_rank: int = 8      #: chance = the copy R^2 of the image's rank-th best distinct real patch

    def validate(self, where: str = "copy detector") -> None:
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"{where}: threshold must be in (0, 1], got {self.threshold}")
        if self.blur_sigma < 0 or not 0 <= self.margin_frac < 0.5:
            raise ConfigError(f"{where}: need blur_sigma >= 0 and 0 <= margin_frac < 0.5")
        if self.topk < 1 or self.max_mix < 1 or self.chunk < 1 or self.coarse_template < 4:
            raise ConfigError(f"{where}: need topk, max_mix, chunk >= 1 and coarse_template >= 4")
        if not 0 < self.unique_floor <= 1 or not 0 <= self.unique_ratio < 1 or self.uniqueness_rank < 2:
            raise ConfigError(f"{where}: need 0 < unique_floor <= 1, 0 <= unique_ratio < 1 and uniqueness_rank >= 2")

    def flags(self, r2: float, copy_r2: float, chance: float, threshold: float) -> str:
        """Why an image is flagged ("" = it is not): ``r2`` its best explanation (copy or mixture), ``copy_r2``
        its best single real window, ``chance`` the copy R^2 of its ``uniqueness_rank``-th best real patch."""
        if r2 >= threshold:
            return f"R^2 {r2:.3f} >= {threshold:g}"
        if copy_r2 >= self.unique_floor and (1.0 - copy_r2) <= self.unique_ratio * (1.0 - chance):
            return (f"R^2 {copy_r2:.3f} >= {self.unique_floor:g} and it stands out from chance: unexplained "
                    f"{1 - copy_r2:.3f} <= {self.unique_ratio:g} x {1 - chance:.3f} left by the "
                    f"{_ordinal(self.uniqueness_rank)}-best real patch")
        return ""


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


@dataclass
class CopyFinding:
    """The best explanation of one synthetic image by real patches."""

    synthetic: int
    kind: str                         #: "copy", "mixture" or "bland"
    r2: float                         #: explained variance of the best explanation (copy or mixture)
    copy_r2: float
    mixture_r2: list[float]           #: R^2 with 1..max_mix atoms
    sources: list[int]                #: real patch indices of the best explanation
    weights: list[float]              #: their least-squares weights (mixture) / colour map gain (copy)
    transform: str                    #: dihedral transform, shift and colour map in words
    view: str                         #: the view of the real patches it was found in
    flagged: bool = False
    ranked_r2: list[float] = field(default_factory=list)   #: copy R^2 of the best distinct real patches, best first
    chance_r2: float = 0.0            #: the uniqueness_rank-th of them (0 when fewer real patches were found)
    why: str = ""                     #: the rule that flagged it
    source_names: list[str] = field(default_factory=list)

    def describe(self, threshold: float) -> str:
        names = [f"{s}" + (f" ({n})" if n else "") for s, n in zip(self.sources, self.source_names or [""] * len(self.sources))]
        what = ("a copy of real patch " + names[0]) if self.kind == "copy" else (
            f"a mixture of real patches {', '.join(names)}")
        where = "as given" if self.view == "as given" else f"as {self.view}"
        why = self.why or f"R^2 {self.r2:.3f} >= {threshold:g}"
        return f"synthetic image {self.synthetic} is {what} [{self.transform}; {why}; real patches {where}]"


@dataclass
class CopyReport:
    """Per-image findings of :func:`detect_copies` over every audited view (the worst per image kept)."""

    findings: list[CopyFinding]
    threshold: float
    n_real: int
    views: list[str]
    seconds: float
    config: CopyDetectorConfig

    @property
    def flagged(self) -> list[CopyFinding]:
        return [f for f in self.findings if f.flagged]

    def reasons(self) -> list[str]:
        """One line per flagged image (all of them, not just the worst)."""
        return [f.describe(self.threshold) for f in self.flagged]

    def summary(self) -> dict[str, Any]:
        r2 = [f.r2 for f in self.findings if f.kind != "bland"]
        return {"rule": "copy detector (transform-invariant; read by neither the distillation nor the candidate choice)",
                "threshold": self.threshold, "unique_floor": self.config.unique_floor, "unique_ratio": self.config.unique_ratio,
                "uniqueness_rank": self.config.uniqueness_rank, "n_synthetic": len(self.findings), "n_real": self.n_real,
                "views": list(self.views), "flagged": [f.synthetic for f in self.flagged],
                "bland": [f.synthetic for f in self.findings if f.kind == "bland"],
                "max_r2": round(max(r2), 4) if r2 else None, "median_r2": round(float(np.median(r2)), 4) if r2 else None,
                "seconds": round(self.seconds, 2)}

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "config": asdict(self.config),
                "per_synthetic": [asdict(f) for f in self.findings]}


# ---------------------------------------------------------------------------- image helpers
def dihedral(x: torch.Tensor, d: int) -> torch.Tensor:
    """Dihedral transform ``d`` (0-7: rotate by 90*d, then mirror for d >= 4) of the last two dims."""
    y = torch.rot90(x, d % 4, dims=(-2, -1))
    return y.flip(-1) if d >= 4 else y


def dihedral_inverse(x: torch.Tensor, d: int) -> torch.Tensor:
    y = x.flip(-1) if d >= 4 else x
    return torch.rot90(y, -(d % 4), dims=(-2, -1))


def _gauss_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable gaussian blur of (N, C, H, W) with reflect padding (two small matrix products)."""
    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(2.5 * sigma)))
    r = min(r, x.shape[-1] - 1, x.shape[-2] - 1)
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    return band_matrix(k, x.shape[-2], reflect=True) @ x @ band_matrix(k, x.shape[-1], reflect=True).T


def _prep(images: np.ndarray, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC -> (low-passed grey N,H,W; low-passed RGB N,3,H,W), floats in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    out_g, out_c = [], []
    for i in range(0, len(x), 1024):
        c = _gauss_blur(x[i:i + 1024], sigma)
        out_c.append(c)
        out_g.append(c.mean(1))
    return torch.cat(out_g), torch.cat(out_c)


def _normalise(v: torch.Tensor, floor: float) -> torch.Tensor:
    """Rows of ``v`` (N, D): zero mean, unit norm (with ``floor`` added to the variance)."""
    v = v - v.mean(1, keepdim=True)
    return v / torch.sqrt((v * v).sum(1, keepdim=True) + v.shape[1] * floor)


# ---------------------------------------------------------------------------- copy search
def _coarse_topk(raw_g: torch.Tensor, templ: torch.Tensor, stride: int, k: int, floor: float, chunk: int):
    """Top-``k`` windows of ``raw_g`` (N, R, R) per template (T, h, h) by |NCC| at ``stride``.

    Returns (values T x k, real index T x k, y T x k, x T x k) in full-resolution pixels.
    """
    if stride > 1:
        rg = F.avg_pool2d(raw_g[:, None], stride)[:, 0]
        tp = F.avg_pool2d(templ[:, None], stride)[:, 0]
    else:
        rg, tp = raw_g, templ
    T, h = tp.shape[0], tp.shape[-1]
    n_pix = h * h
    flat_t = tp.reshape(T, -1)
    # windows much flatter than the template are shrunk towards 0 (a near-blank window has no layout)
    floor_t = (floor * flat_t.var(1, unbiased=False)).view(1, T, 1, 1)
    w = (_normalise(flat_t, 0.0) / math.sqrt(n_pix)).reshape(T, 1, h, h)   # dot / sqrt(n_pix) in one product
    ones = torch.ones(1, 1, h, h)
    best_v = torch.full((T, k), -1.0)
    best_i = torch.zeros((T, k), dtype=torch.long)
    P = rg.shape[-1] - h + 1
    # ~6 float maps of (chunk, T, P, P) live at once: keep them within COARSE_BYTES however many images are audited
    chunk = max(1, min(chunk, COARSE_BYTES // (6 * 4 * T * P * P)))
    for s in range(0, len(rg), chunk):
        xb = rg[s:s + chunk, None]
        xb = xb - xb.mean((2, 3), keepdim=True)                 # less cancellation in E[x^2] - E[x]^2
        dot = F.conv2d(xb, w)                                   # (B, T, P, P) = sum t_hat * window / sqrt(n_pix)
        m1 = F.conv2d(xb, ones) / n_pix
        m2 = F.conv2d(xb * xb, ones) / n_pix
        var = (m2 - m1 * m1).clamp_min(0.0)
        # |NCC| = |dot| / sqrt(var + floor), computed in place on the big (B, T, P, P) map (half the passes);
        # the clamp (rounding only: |NCC| <= 1) is applied to the per-pair maxima
        ncc = dot.mul_((var + floor_t).rsqrt_()).abs_()
        per_real, pos = ncc.flatten(2).max(2)                   # best position per (real, template): (B, T)
        per_real = per_real.clamp_max_(1.0)
        kk = min(k, per_real.shape[0])
        v, i = per_real.T.topk(kk, dim=1)                       # (T, kk) distinct real patches
        p = pos.T.gather(1, i)
        allv = torch.cat([best_v, v], 1)
        alli = torch.cat([best_i, (i + s) * P * P + p], 1)
        best_v, j = allv.topk(k, dim=1)
        best_i = alli.gather(1, j)
    b = best_i // (P * P)
    rem = best_i % (P * P)
    return best_v, b, (rem // P) * stride, (rem % P) * stride


def _fit_r2(target: torch.Tensor, regressors: torch.Tensor) -> torch.Tensor:
    """R^2 of least squares ``target`` (M, D) ~ const + ``regressors`` (M, D, q), batched."""
    t = target - target.mean(1, keepdim=True)
    X = regressors - regressors.mean(1, keepdim=True)
    tss = (t * t).sum(1).clamp_min(1e-12)
    G = X.transpose(1, 2) @ X + 1e-6 * torch.eye(X.shape[2])
    beta = torch.linalg.solve(G, X.transpose(1, 2) @ t[..., None])
    res = t - (X @ beta)[..., 0]
    return 1.0 - (res * res).sum(1) / tss


def _copy_search(syn_g: torch.Tensor, raw_g: torch.Tensor, raw_c: torch.Tensor, cfg: CopyDetectorConfig, keep: int):
    """Per synthetic image: (R^2, real index, dihedral, y, x, colour gain sign) of its best single-window copy."""
    n, s = syn_g.shape[0], syn_g.shape[-1]
    m = int(round(s * cfg.margin_frac))
    inner = syn_g[:, m:s - m, m:s - m]
    h = inner.shape[-1]
    R = raw_g.shape[-1]
    if h > R:
        raise InputError(f"copy detector: synthetic images ({s} px) are larger than the real patches in this view ({R} px)")
    templ = torch.stack([dihedral(inner, d) for d in range(8)], 1).reshape(n * 8, h, h)
    stride = max(1, h // cfg.coarse_template)
    vals, b, y, x = _coarse_topk(raw_g, templ, stride, cfg.topk, cfg.var_floor, cfg.chunk)
    # refine at full resolution: the grey NCC at every offset within +-(stride-1) of each coarse hit (one grouped
    # convolution over a padded region per candidate), then the RGB colour-map R^2 at the best offset
    T, K = b.shape
    r = stride - 1
    Hr = h + 2 * r
    y0 = (y - r).clamp(0, R - Hr) if R >= Hr else torch.zeros_like(y)
    x0 = (x - r).clamp(0, R - Hr) if R >= Hr else torch.zeros_like(x)
    Hr = min(Hr, R)
    idx_b = b.reshape(-1)

    def gather(img: torch.Tensor, yy: torch.Tensor, xx: torch.Tensor, size: int) -> torch.Tensor:
        ar = torch.arange(size)
        rows = (yy.reshape(-1, 1) + ar)[:, :, None].expand(-1, size, size)
        cols = (xx.reshape(-1, 1) + ar)[:, None, :].expand(-1, size, size)
        if img.dim() == 3:
            return img[idx_b[:, None, None], rows, cols]
        c = img.shape[1]
        return img[idx_b[:, None, None, None], torch.arange(c)[None, :, None, None], rows[:, None], cols[:, None]]

    region = gather(raw_g, y0, x0, Hr)                                               # (T*K, Hr, Hr)
    region = region - region.mean((1, 2), keepdim=True)
    tflat = templ.reshape(T, -1)
    tn = _normalise(tflat, 0.0).repeat_interleave(K, 0).reshape(T * K, 1, h, h)
    dot = F.conv2d(region[None], tn, groups=T * K)[0]                                # (T*K, o, o)
    ones = torch.ones(1, 1, h, h)
    m1 = F.conv2d(region[:, None], ones)[:, 0] / (h * h)
    m2 = F.conv2d(region[:, None] ** 2, ones)[:, 0] / (h * h)
    var = (m2 - m1 * m1).clamp_min(1e-12)
    ncc = (dot / torch.sqrt(h * h * var)).abs().flatten(1)                           # (T*K, o*o)
    o = Hr - h + 1
    j = ncc.argmax(1)
    wy, wx = y0.reshape(-1) + j // o, x0.reshape(-1) + j % o
    win = gather(raw_c, wy, wx, h)                                                   # (T*K, 3, h, h)
    reg = win.reshape(T * K, 3, -1).transpose(1, 2)
    tgt = tflat.repeat_interleave(K, 0)
    r2 = _fit_r2(tgt, reg)
    if cfg.extra_blur > 0:   # a blurred copy: the real window blurred as much explains it better
        reg_b = _gauss_blur(win, cfg.extra_blur).reshape(T * K, 3, -1).transpose(1, 2)
        r2 = torch.maximum(r2, _fit_r2(tgt, reg_b))
    r2 = torch.where(reg.std(1).amax(1) > 1e-3, r2, torch.zeros_like(r2)).reshape(T, K)   # flat windows explain nothing
    cand = r2
    best, jj = r2.max(1)
    pick = jj[:, None]
    best_arg = torch.stack([b.gather(1, pick)[:, 0], wy.reshape(T, K).gather(1, pick)[:, 0],
                            wx.reshape(T, K).gather(1, pick)[:, 0]], 1)
    best = best.reshape(n, 8)
    r2, d = best.max(1)
    arg = best_arg.reshape(n, 8, 3)[torch.arange(n), d]
    return r2, arg[:, 0], d, arg[:, 1], arg[:, 2], m, _distinct_sources(cand, b, n, keep)


def _distinct_sources(cand: torch.Tensor, b: torch.Tensor, n: int, rank: int) -> list[list[float]]:
    """Per synthetic image, the refined R^2 of its ``rank`` best *distinct* real patches (best first), from the
    candidates of all 8 transforms (``cand``, ``b``: (n*8, K)). How well unrelated tissue explains the image."""
    out = []
    for i in range(n):
        r = cand[i * 8:(i + 1) * 8].reshape(-1)
        src = b[i * 8:(i + 1) * 8].reshape(-1)
        per: dict[int, float] = {}
        for v, s in zip(r.tolist(), src.tolist()):
            if v > per.get(s, -1.0):
                per[s] = v
        out.append([round(v, 4) for v in sorted(per.values(), reverse=True)[:rank]])
    return out


# ---------------------------------------------------------------------------- mixture search
def _mixture_search(syn_g: torch.Tensor, atoms_g: torch.Tensor, cfg: CopyDetectorConfig):
    """Per synthetic image: R^2 with 1..max_mix atoms (OMP over real view patches x 8 transforms), atoms, weights."""
    n, s = syn_g.shape[0], syn_g.shape[-1]
    A = atoms_g.reshape(len(atoms_g), -1)
    A = A - A.mean(1, keepdim=True)                                              # (N, D), centred
    nrm2 = (A * A).sum(1)
    out_r2, out_atoms, out_w = [], [], []
    for i in range(n):
        t = syn_g[i].reshape(-1)
        t0 = t - t.mean()
        tss = float((t0 * t0).sum().clamp_min(1e-12))
        res = t0.clone()
        denom = torch.sqrt(nrm2 + cfg.var_floor * tss)        # flat atoms are shrunk (tss = D * var(t))
        chosen: list[tuple[int, int]] = []
        cols: list[torch.Tensor] = []
        r2s: list[float] = []
        ws: list[list[float]] = []
        for _ in range(min(cfg.max_mix, len(atoms_g))):
            rt = torch.stack([dihedral(res.reshape(s, s), d).reshape(-1) for d in range(8)])   # (8, D)
            c = (rt @ A.T).abs() / denom                                                   # (8, N)
            for d, b in chosen:
                c[d, b] = -1.0
            flat = int(c.reshape(-1).argmax())
            d, b = divmod(flat, len(atoms_g))
            chosen.append((d, b))
            cols.append(dihedral_inverse(atoms_g[b], d).reshape(-1))
            X = torch.stack(cols, 1)
            Xc = X - X.mean(0, keepdim=True)
            w = torch.linalg.lstsq(Xc, t0[:, None]).solution[:, 0]
            res = t0 - Xc @ w
            r2s.append(1.0 - float((res * res).sum()) / tss)
            ws.append([round(float(v), 4) for v in w])
        out_r2.append(r2s)
        out_atoms.append(chosen)
        out_w.append(ws)
    return out_r2, out_atoms, out_w


# ---------------------------------------------------------------------------- API
def view_scale_images(raw: np.ndarray, view: ViewSpec | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(raw patches at the view's scale - the windows a copy may come from; the patches in the view - the
    mixture atoms; a description). ``view`` None: the patches as given."""
    if view is None or view.is_identity:
        return raw, raw, "as given"
    if raw.shape[1] != view.source_size:
        raise InputError(f"copy detector: real patches are {raw.shape[1]} px, the view {view.describe()} needs "
                         f"{view.source_size} px")
    crop = view.crop or view.source_size
    scale = view.out_size / crop
    big = int(round(view.source_size * scale))
    at_scale = resize_images(raw, big) if big != raw.shape[1] else raw
    return at_scale, apply_view_images(raw, view), view.describe()


def _explain(synthetic: np.ndarray, real_raw: np.ndarray, views: list[ViewSpec | None],
             cfg: CopyDetectorConfig) -> tuple[list[list[CopyFinding]], list[str]]:
    """Every image's best explanation in each of ``views`` (not yet flagged), and the views' descriptions."""
    syn_g, _ = _prep(synthetic, cfg.blur_sigma)
    std = syn_g.reshape(len(syn_g), -1).std(1)
    per_image: list[list[CopyFinding]] = [[] for _ in range(len(synthetic))]
    texts = []
    for view in views:
        at_scale, in_view, text = view_scale_images(real_raw, view)
        texts.append(text)
        if in_view.shape[1] != synthetic.shape[1]:
            raise InputError(f"copy detector: the real patches in view {text} are {in_view.shape[1]} px, the "
                             f"synthetic images {synthetic.shape[1]} px")
        raw_g, raw_c = _prep(at_scale, cfg.blur_sigma)
        r2, src, d, yy, xx, m, ranked = _copy_search(syn_g, raw_g, raw_c, cfg, max(RANKED_KEEP, cfg.uniqueness_rank))
        atoms_g, _ = _prep(in_view, cfg.blur_sigma)
        mix_r2, mix_atoms, mix_w = _mixture_search(syn_g, atoms_g, cfg)
        R = raw_g.shape[-1]
        centre = (R - (synthetic.shape[1] - 2 * m)) // 2
        for i in range(len(synthetic)):
            c = float(r2[i])
            mr = [round(v, 4) for v in mix_r2[i]]
            k_best = int(np.argmax(mix_r2[i]))
            if c >= max(mix_r2[i]):
                f = CopyFinding(i, "copy", c, c, mr, [int(src[i])], [],
                                f"{DIHEDRAL_NAMES[int(d[i])]}, window at ({int(yy[i]) - centre:+d}, "
                                f"{int(xx[i]) - centre:+d}) px from the centre of the {R}-px patch, affine RGB colour map",
                                text)
            else:
                atoms = mix_atoms[i][:k_best + 1]
                f = CopyFinding(i, "mixture", float(mix_r2[i][k_best]), c, mr, [a[1] for a in atoms], mix_w[i][k_best],
                                "transforms " + ", ".join(DIHEDRAL_NAMES[a[0]] for a in atoms) + ", aligned", text)
            f.ranked_r2 = ranked[i]
            k = cfg.uniqueness_rank
            f.chance_r2 = float(ranked[i][k - 1]) if len(ranked[i]) >= k else 0.0
            if float(std[i]) < cfg.bland_std:
                f.kind = "bland"
            per_image[i].append(f)
    return per_image, texts


def _decide(per_view: list[CopyFinding], threshold: float, cfg: CopyDetectorConfig) -> CopyFinding:
    """Flag each view's finding by the rules; keep the flagged one with the highest R^2, else the highest R^2."""
    for f in per_view:
        f.why = "" if f.kind == "bland" else cfg.flags(f.r2, f.copy_r2, f.chance_r2, threshold)
        f.flagged = bool(f.why)
    return max(per_view, key=lambda f: (f.flagged, f.r2))


def detect_copies(synthetic: np.ndarray, real_raw: np.ndarray, views: list[ViewSpec | None],
                  config: CopyDetectorConfig | None = None, *, real_names: list[str] | None = None,
                  num_threads: int | None = None) -> CopyReport:
    """Find, for every synthetic image (uint8 NHWC), its best explanation by the real patches.

    ``real_raw``: the centre's real patches as they sit on disk (uint8 NHWC); ``views``: the views to
    search (the set's recorded view and the other plausible ones; None = the patches as given). The
    image is flagged in a view by :meth:`CopyDetectorConfig.flags`; per image the flagged view (else the
    best-explained one) is kept. ``real_names`` (optional) name the sources in the report.
    """
    cfg = config or CopyDetectorConfig()
    cfg.validate()
    if synthetic.ndim != 4 or real_raw.ndim != 4 or synthetic.shape[-1] != 3 or real_raw.shape[-1] != 3:
        raise InputError("copy detector: images must be uint8 N x H x W x 3")
    if len(real_raw) == 0:
        raise InputError("copy detector: no real patches to compare with")
    if not views:
        raise InputError("copy detector: no view to search")
    t0 = time.perf_counter()
    prev = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    try:
        with torch.no_grad():
            per_image, texts = _explain(synthetic, real_raw, views, cfg)
    finally:
        torch.set_num_threads(prev)
    findings = [_decide(per_view, cfg.threshold, cfg) for per_view in per_image]
    for f in findings:
        if real_names is not None:
            f.source_names = [real_names[s] if 0 <= s < len(real_names) else "" for s in f.sources]
    return CopyReport(findings, cfg.threshold, len(real_raw), texts, time.perf_counter() - t0, cfg)
