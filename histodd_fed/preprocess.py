"""One preprocessing step for every stage: a *view* of a patch (centre crop, then resize).

A :class:`ViewSpec` says how patches as they sit on disk (``source_size`` px) become the pixels a
model, a distillation or an audit sees: keep the central ``crop`` px (PCam's label lives in the
central 32 px of a 96 px patch), then resize to ``size`` px with ``interpolation``. A PatchSet that
went through a view records it in ``meta["view"]``; a synthetic set records the view of the real
patches it was distilled from, so the privacy gate, coresets and evaluation can apply the same view
to real and test patches (:func:`to_view`) or refuse with a clear error when they cannot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from histodd_fed.errors import InputError
from histodd_fed.patchset import PatchSet

INTERPOLATIONS = ("bilinear_aa",)
META_KEY = "view"


@dataclass(frozen=True)
class ViewSpec:
    """Centre crop (``crop`` px, None: none) then resize to ``size`` px of ``source_size`` px patches."""

    source_size: int
    crop: int | None = None
    size: int | None = None
    interpolation: str = "bilinear_aa"

    def __post_init__(self) -> None:
        # canonical form (so equal views compare equal): a crop of the whole patch is no crop, a
        # resize to the size the patch already has is no resize
        if self.crop is not None and self.crop == self.source_size:
            object.__setattr__(self, "crop", None)
        if self.size is not None and self.size == (self.crop or self.source_size):
            object.__setattr__(self, "size", None)
        if self.interpolation not in INTERPOLATIONS:
            raise InputError(f"view: interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.crop is not None and not (1 <= self.crop <= self.source_size):
            raise InputError(f"view: centre crop {self.crop} px does not fit patches of {self.source_size} px")
        if self.size is not None and self.size < 1:
            raise InputError(f"view: size must be >= 1, got {self.size}")

    @property
    def out_size(self) -> int:
        """Side of the viewed patches."""
        return self.size or self.crop or self.source_size

    @property
    def is_identity(self) -> bool:
        return self.crop is None and self.size is None

    @property
    def slug(self) -> str:
        """A short file-name-safe name: ``96px``, ``96px-crop32``, ``96px-crop48-to32``, ``96px-to32``."""
        return f"{self.source_size}px" + (f"-crop{self.crop}" if self.crop else "") + (
            f"-to{self.size}" if self.size else "")

    def with_size(self, size: int) -> "ViewSpec":
        """This view, resized to ``size`` px at the end."""
        return replace(self, size=None if size == (self.crop or self.source_size) else size)

    def describe(self) -> str:
        parts = [f"{self.source_size} px"]
        if self.crop not in (None, self.source_size):
            parts.append(f"centre crop {self.crop}")
        if self.out_size != (self.crop or self.source_size):
            parts.append(f"resize {self.out_size} ({self.interpolation})")
        return " -> ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "view") -> "ViewSpec":
        if not isinstance(data, dict):
            raise InputError(f"{where}: view must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {"source_size", "crop", "size", "interpolation"})
        if unknown or "source_size" not in data:
            raise InputError(f"{where}: bad view {data!r} (keys: source_size, crop, size, interpolation)")
        try:
            return cls(source_size=int(data["source_size"]),
                       crop=None if data.get("crop") is None else int(data["crop"]),
                       size=None if data.get("size") is None else int(data["size"]),
                       interpolation=str(data.get("interpolation", "bilinear_aa")))
        except (TypeError, ValueError) as exc:
            raise InputError(f"{where}: bad view {data!r} ({exc})") from exc

    @classmethod
    def make(cls, source_size: int, crop: int | None = None, size: int | None = None) -> "ViewSpec":
        """``source_size`` px patches, optional centre ``crop``, optional final ``size``."""
        return cls(source_size=int(source_size), crop=None if crop is None else int(crop),
                   size=None if size is None else int(size))

    @classmethod
    def resize(cls, source_size: int, size: int) -> "ViewSpec":
        return cls(source_size=source_size, size=None if size == source_size else size)

    @classmethod
    def centre_crop(cls, source_size: int, crop: int, size: int | None = None) -> "ViewSpec":
        return cls(source_size=source_size, crop=crop, size=None if size in (None, crop) else size)


# ---------------------------------------------------------------------------- arrays
def crop_images(images: np.ndarray, crop: int) -> np.ndarray:
    """The central ``crop`` x ``crop`` pixels of uint8 NHWC images."""
    h, w = images.shape[1:3]
    if crop > min(h, w) or crop < 1:
        raise InputError(f"centre crop {crop} px does not fit patches of {h}x{w} px")
    top, left = (h - crop) // 2, (w - crop) // 2
    return np.ascontiguousarray(images[:, top:top + crop, left:left + crop])


def resize_images(images: np.ndarray, size: int, chunk: int = 512) -> np.ndarray:
    """uint8 NHWC -> uint8 NHWC of ``size`` px (antialiased bilinear); unchanged if already that size."""
    if images.shape[1] == size and images.shape[2] == size:
        return np.ascontiguousarray(images)
    import torch
    import torch.nn.functional as F

    out = np.empty((len(images), size, size, images.shape[3] if images.ndim == 4 else 3), dtype=np.uint8)
    for s in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[s:s + chunk])).permute(0, 3, 1, 2).float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[s:s + chunk] = y.round().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def apply_view_images(images: np.ndarray, spec: ViewSpec) -> np.ndarray:
    """Apply ``spec`` to uint8 NHWC images of ``spec.source_size`` px."""
    if images.shape[1] != spec.source_size or images.shape[2] != spec.source_size:
        raise InputError(f"view {spec.describe()}: patches are {images.shape[1]}x{images.shape[2]} px, "
                         f"expected {spec.source_size}")
    x = images
    if spec.crop not in (None, spec.source_size):
        x = crop_images(x, int(spec.crop))
    return resize_images(x, spec.out_size)


# ---------------------------------------------------------------------------- patch sets
def recorded_view(ps: PatchSet) -> ViewSpec | None:
    """The view ``ps`` records in its meta (None: none recorded)."""
    v = ps.meta.get(META_KEY)
    return None if v is None else ViewSpec.from_dict(v, where="patch set meta")


def current_view(ps: PatchSet) -> ViewSpec:
    """The view ``ps`` is in: the one it records, else none at all (its own size, as it sits on disk)."""
    return recorded_view(ps) or ViewSpec(source_size=ps.image_size)


def resize_to(ps: PatchSet, size: int) -> PatchSet:
    """``ps`` resized to ``size`` px (unchanged when already so); the recorded view gains the resize.

    For patch sets already in a view (a synthetic set, a cropped store) the images are resampled
    once more; the recorded view says what a raw patch goes through to look like them.
    """
    if ps.image_size == size and ps.images.shape[2] == size:
        return ps
    out = ps.subset(np.arange(len(ps)))
    out.images = resize_images(ps.images, size) if len(ps) else np.zeros((0, size, size, 3), np.uint8)
    out.meta = {**out.meta, META_KEY: current_view(ps).with_size(size).to_dict()}
    out.validate()
    return out


def prepare(ps: PatchSet, *, view: ViewSpec | None = None, crop: int | None = None, size: int | None = None,
            where: str = "patches") -> PatchSet:
    """What every loader does: put ``ps`` in ``view`` (see :func:`to_view`), or centre-crop it to ``crop``
    px and resize it to ``size`` px; then resize to ``size`` px if it is not that size yet."""
    if view is not None:
        ps = to_view(ps, view, where=where)
    elif crop is not None:
        have = recorded_view(ps)
        if have is not None and not have.is_identity:
            raise InputError(f"{where}: patches are already in view {have.describe()}; a centre crop applies to "
                             f"raw patches")
        ps = apply_view(ps, ViewSpec.make(ps.image_size, crop, size))
    return resize_to(ps, size) if size else ps


def apply_view(ps: PatchSet, spec: ViewSpec) -> PatchSet:
    """A copy of raw ``ps`` (patches of ``spec.source_size`` px) in view ``spec``, recorded in its meta."""
    if recorded_view(ps) is not None and not recorded_view(ps).is_identity:
        raise InputError(f"patch set is already in view {recorded_view(ps).describe()}; apply views to raw patches")
    out = ps.subset(np.arange(len(ps)))
    out.images = apply_view_images(ps.images, spec) if len(ps) else np.zeros((0, spec.out_size, spec.out_size, 3),
                                                                             np.uint8)
    out.meta = {**out.meta, META_KEY: spec.to_dict()}
    out.validate()
    return out


def to_view(ps: PatchSet, spec: ViewSpec, where: str = "patches") -> PatchSet:
    """``ps`` in view ``spec``: unchanged when it records that view, transformed when it is raw at
    ``spec.source_size`` px; otherwise an :class:`InputError` naming ``where`` and both views."""
    have = recorded_view(ps)
    if have is not None and not have.is_identity:
        if (have.source_size, have.crop, have.out_size) == (spec.source_size, spec.crop, spec.out_size):
            return ps
        raise InputError(f"{where}: patches are in view {have.describe()}, the set needs {spec.describe()}; "
                         f"give the raw {spec.source_size}-px patches")
    if ps.image_size == spec.source_size:
        return apply_view(ps, spec)
    raise InputError(f"{where}: patches are {ps.image_size} px; the set was made from {spec.describe()}; give the "
                     f"raw {spec.source_size}-px patches it came from")


def audit_views(spec: ViewSpec | None, real_size: int, syn_size: int) -> list[ViewSpec]:
    """Views of raw ``real_size``-px real patches a ``syn_size``-px synthetic set is audited against.

    The recorded view first; then, as the issue of a set audited against the wrong view showed, the
    other plausible view of the same size (resize only <-> centre crop) so the worst one decides.
    Without a recorded view: resize only and, when the patches are larger, a centre crop of the
    synthetic size.
    """
    views: list[ViewSpec] = []
    if spec is not None and spec.source_size == real_size:
        views.append(spec)
    views.append(ViewSpec.resize(real_size, syn_size))
    if real_size > syn_size:
        views.append(ViewSpec.centre_crop(real_size, syn_size))
        if spec is not None and spec.crop not in (None, real_size) and spec.crop != syn_size:
            views.append(ViewSpec.centre_crop(real_size, int(spec.crop), syn_size))
    seen, out = set(), []
    for v in views:
        key = (v.crop if v.crop != real_size else None, v.out_size)
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out
