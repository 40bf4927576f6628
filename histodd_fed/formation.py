"""Multi-formation: one stored synthetic image holds ``factor`` x ``factor`` smaller training images.

Under a fixed storage budget (``ipc`` images of ``S`` px per class), a set may store each image as a
``factor`` x ``factor`` grid of tiles of ``S / factor`` px; a consumer *decodes* it into
``ipc * factor**2`` training images of ``S`` px per class by upsampling every tile (bilinear). This
is the multi-formation of Kim et al., "Dataset Condensation via Efficient Synthetic-Data
Parameterization" (IDC, ICML 2022): same bytes, more (lower-resolution) training images.

A set made that way records ``meta["formation"] = {"factor": f}``. Every stage that trains on a set
or audits it calls :func:`decode_set` first (evaluation, fine-tuning at a target centre, the privacy
gate); :func:`encode` is what the distillation engine uses to pack its initial images.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from histodd_fed.errors import InputError
from histodd_fed.patchset import PatchSet
from histodd_fed.preprocess import META_KEY as VIEW_KEY
from histodd_fed.preprocess import recorded_view

META_KEY = "formation"


def formation_factor(ps: PatchSet) -> int:
    """The multi-formation factor ``ps`` records (1: stored images are the training images)."""
    rec = ps.meta.get(META_KEY)
    if rec is None:
        return 1
    f = rec.get("factor") if isinstance(rec, dict) else None
    if type(f) is not int or f < 1:
        raise InputError(f"patch set meta: formation must be {{'factor': int >= 1}}, got {rec!r}")
    if f > 1 and ps.image_size % f:
        raise InputError(f"patch set meta: formation factor {f} does not divide its {ps.image_size}-px patches")
    return f


def _check(x, factor: int) -> None:
    if factor < 1 or x.shape[-1] % factor or x.shape[-2] % factor:
        raise InputError(f"multi-formation: factor {factor} does not divide images of {tuple(x.shape[-2:])} px")


def decode(x, factor: int):
    """(n, C, S, S) float tensor -> (n * factor**2, C, S, S): each tile of a ``factor`` x ``factor``
    split, row-major, upsampled bilinearly to ``S`` px. Differentiable; identity for factor 1."""
    import torch.nn.functional as F

    _check(x, factor)
    if factor == 1:
        return x
    n, c, h, w = x.shape
    th, tw = h // factor, w // factor
    tiles = x.reshape(n, c, factor, th, factor, tw).permute(0, 2, 4, 1, 3, 5).reshape(n * factor * factor, c, th, tw)
    return F.interpolate(tiles, size=(h, w), mode="bilinear", align_corners=False)


def encode(x, factor: int):
    """(n * factor**2, C, S, S) -> (n, C, S, S): images downsampled (antialiased) to ``S / factor`` px
    and packed row-major into one image per ``factor**2`` consecutive inputs. Inverse of :func:`decode`
    up to resampling; identity for factor 1."""
    import torch.nn.functional as F

    _check(x, factor)
    if factor == 1:
        return x
    m, c, h, w = x.shape
    if m % (factor * factor):
        raise InputError(f"multi-formation: {m} images do not fill whole {factor}x{factor} grids")
    small = F.interpolate(x, size=(h // factor, w // factor), mode="bilinear", antialias=True, align_corners=False)
    n = m // (factor * factor)
    return small.reshape(n, factor, factor, c, h // factor, w // factor).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def pack_set(ps: PatchSet, factor: int) -> PatchSet:
    """``ps`` (``factor**2 * k`` images per class) packed into ``k`` stored images per class with
    :func:`encode` (class by class, in order), recording ``meta["formation"]``: e.g. real patches at the
    same storage as a multi-formation synthetic set."""
    import torch

    order = np.argsort(ps.labels, kind="stable")
    rep = factor * factor
    if any(n % rep for n in ps.class_counts().values()):
        raise InputError(f"multi-formation: class counts {ps.class_counts()} are not multiples of {rep}")
    x = torch.from_numpy(np.ascontiguousarray(ps.images[order])).permute(0, 3, 1, 2).float()
    y = encode(x, factor).round().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return PatchSet(images=np.ascontiguousarray(y), labels=ps.labels[order][::rep], class_names=list(ps.class_names),
                    kind=ps.kind, meta={**ps.meta, META_KEY: {"factor": factor}})


def tiles(ps: PatchSet) -> PatchSet:
    """The tiles of a multi-formation set as a set of ``S / factor``-px images (what :func:`decode_set`
    upsamples); ``ps`` itself when it records no formation. The privacy gate audits these too."""
    f = formation_factor(ps)
    if f == 1:
        return ps
    n, h, w, c = ps.images.shape
    t = ps.images.reshape(n, f, h // f, f, w // f, c).transpose(0, 1, 3, 2, 4, 5).reshape(n * f * f, h // f, w // f, c)
    note: dict[str, Any] = {"tiles_of": {"factor": f, "stored_images": n}}
    view = recorded_view(ps)
    if view is not None:
        note[VIEW_KEY] = view.with_size(h // f).to_dict()
    return _expanded(ps, np.ascontiguousarray(t), f, note)


def decode_set(ps: PatchSet) -> PatchSet:
    """The training images of ``ps``: decoded when it records a formation factor > 1, else ``ps``."""
    f = formation_factor(ps)
    if f == 1:
        return ps
    import torch

    x = torch.from_numpy(np.ascontiguousarray(ps.images)).permute(0, 3, 1, 2).float()
    y = decode(x, f).round().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return _expanded(ps, np.ascontiguousarray(y), f, {"decoded_from": {"factor": f, "stored_images": len(ps)}})


def _expanded(ps: PatchSet, images: np.ndarray, f: int, note: dict[str, Any]) -> PatchSet:
    rep = f * f
    meta = {k: v for k, v in ps.meta.items() if k != META_KEY} | note
    return PatchSet(images=images, labels=np.repeat(ps.labels, rep), class_names=list(ps.class_names),
                    slide_index=np.repeat(ps.slide_index, rep), slide_ids=list(ps.slide_ids),
                    slide_labels=dict(ps.slide_labels), kind=ps.kind, meta=meta)
