"""The patch set: the one on-disk format for real patch stores, coresets and synthetic sets.

A patch set directory holds

- ``images.npy``      uint8 (N, H, W, 3), RGB; loaded with ``mmap_mode="r"`` for large stores
- ``labels.npy``      int64 (N,), indices into ``class_names``
- ``slide_index.npy`` int32 (N,), indices into ``slides`` in ``patchset.json`` (-1 = none)
- ``coords.npy``      int64 (N, 2), optional: level-0 (x, y) of each patch's top-left corner
- ``patchset.json``   format version, kind, class names, slide ids, slide labels, counts, meta

Nothing is pickled; loading uses ``allow_pickle=False``. Writes are atomic (temp dir + rename).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from histodd_fed.atomic import atomic_directory
from histodd_fed.errors import InputError

FORMAT_VERSION = 1
KINDS = ("real", "coreset", "synthetic")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class PatchSet:
    """Labelled RGB patches, optionally tied to slides.

    ``slide_ids`` lists the distinct slides; ``slide_index[i]`` says which slide patch ``i`` came
    from (-1 when not from a slide). ``slide_labels`` maps a slide id to its slide-level label
    index (for MIL), when known.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    slide_index: np.ndarray | None = None
    slide_ids: list[str] = field(default_factory=list)
    slide_labels: dict[str, int] = field(default_factory=dict)
    coords: np.ndarray | None = None
    kind: str = "real"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.slide_index is None:
            self.slide_index = np.full(len(self.labels), -1, dtype=np.int32)
        self.slide_index = np.asarray(self.slide_index, dtype=np.int32)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self, where: str = "patch set") -> None:
        im = self.images
        if im.dtype != np.uint8 or im.ndim != 4 or im.shape[-1] != 3:
            raise InputError(f"{where}: images must be uint8 (N,H,W,3), got {im.dtype} {im.shape}")
        n = im.shape[0]
        if self.labels.shape != (n,):
            raise InputError(f"{where}: labels shape {self.labels.shape} does not match {n} images")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise InputError(f"{where}: label out of range for classes {self.class_names}")
        if self.slide_index.shape != (n,):
            raise InputError(f"{where}: slide_index shape {self.slide_index.shape} != ({n},)")
        if n and self.slide_index.max(initial=-1) >= len(self.slide_ids):
            raise InputError(f"{where}: slide_index refers past the {len(self.slide_ids)} slide ids")
        if self.coords is not None and np.asarray(self.coords).shape != (n, 2):
            raise InputError(f"{where}: coords must be (N,2)")
        if self.kind not in KINDS:
            raise InputError(f"{where}: unknown kind {self.kind!r} (expected one of {KINDS})")

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=self.num_classes)
        return {c: int(k) for c, k in zip(self.class_names, counts)}

    def slide_of(self, i: int) -> str | None:
        j = int(self.slide_index[i])
        return self.slide_ids[j] if j >= 0 else None

    def subset(self, idx: Iterable[int] | np.ndarray, kind: str | None = None, meta: dict | None = None) -> "PatchSet":
        """A new in-memory patch set of the rows ``idx`` (slide table kept whole)."""
        idx = np.asarray(list(idx) if not isinstance(idx, np.ndarray) else idx, dtype=np.int64)
        return PatchSet(
            images=np.ascontiguousarray(self.images[idx]),
            labels=self.labels[idx].copy(),
            class_names=list(self.class_names),
            slide_index=self.slide_index[idx].copy(),
            slide_ids=list(self.slide_ids),
            slide_labels=dict(self.slide_labels),
            coords=None if self.coords is None else np.asarray(self.coords)[idx].copy(),
            kind=kind or self.kind,
            meta=dict(self.meta if meta is None else meta),
        )

    def for_slide(self, slide_id: str) -> "PatchSet":
        j = self.slide_ids.index(slide_id)
        return self.subset(np.flatnonzero(self.slide_index == j))

    def to_tensors(self):
        """(float32 images in [0,1], NCHW; int64 labels) as torch tensors."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(self.images)).permute(0, 3, 1, 2).float().div_(255.0)
        return x.contiguous(), torch.from_numpy(self.labels.copy())

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes + self.labels.nbytes + self.slide_index.nbytes)

    # ------------------------------------------------------------------ io
    def save(self, path: str | Path, overwrite: bool = True, *, adopt_images: str | Path | None = None) -> Path:
        """Write atomically to directory ``path``.

        ``adopt_images``: an existing ``.npy`` file that already holds exactly ``self.images``
        (e.g. the memory-mapped file they were written to). It is moved (renamed) into the store
        as ``images.npy`` instead of being written again, so a large store costs no second copy;
        its header must match the images' shape and dtype (checked; the pixels are not re-read).
        The file is consumed even if the save then fails; pass a hard link to keep the original.
        """
        path = Path(path)
        if adopt_images is not None:
            adopt_images = Path(adopt_images)
            try:
                head = np.load(adopt_images, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise InputError(f"{adopt_images}: cannot adopt as images.npy ({exc})") from exc
            desc = f"{head.dtype} {head.shape}"
            ok = head.shape == self.images.shape and head.dtype == np.uint8
            del head
            if not ok:
                raise InputError(f"{adopt_images}: holds {desc}, "
                                 f"not the {self.images.dtype} {self.images.shape} images being saved")
        with atomic_directory(path, overwrite=overwrite) as tmp:
            if adopt_images is not None:
                try:
                    os.replace(adopt_images, tmp / "images.npy")
                except OSError:  # another file system: move by copying
                    shutil.move(str(adopt_images), str(tmp / "images.npy"))
            else:
                np.save(tmp / "images.npy", np.ascontiguousarray(self.images))
            np.save(tmp / "labels.npy", self.labels)
            np.save(tmp / "slide_index.npy", self.slide_index)
            if self.coords is not None:
                np.save(tmp / "coords.npy", np.asarray(self.coords, dtype=np.int64))
            header = {
                "format": "histodd-patchset",
                "format_version": FORMAT_VERSION,
                "kind": self.kind,
                "class_names": list(self.class_names),
                "slide_ids": list(self.slide_ids),
                "slide_labels": {k: int(v) for k, v in self.slide_labels.items()},
                "num_images": len(self),
                "image_shape": list(self.images.shape[1:]),
                "class_counts": self.class_counts(),
                "meta": self.meta,
            }
            (tmp / "patchset.json").write_text(json.dumps(header, indent=2, default=str) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, mmap: bool = False) -> "PatchSet":
        """Load a patch set directory, or import an image folder (``CLASS/*.png|jpg``)."""
        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: no such patch set or image folder")
        if not (path / "patchset.json").exists():
            if path.is_dir():
                return load_image_folder(path)
            raise InputError(f"{path}: not a patch set directory (no patchset.json)")
        try:
            header = json.loads((path / "patchset.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{path / 'patchset.json'}: unreadable ({exc})") from exc
        if header.get("format") != "histodd-patchset":
            raise InputError(f"{path / 'patchset.json'}: not a histodd patch set header")
        if int(header.get("format_version", -1)) > FORMAT_VERSION:
            raise InputError(f"{path}: patch set format {header.get('format_version')} is newer than supported {FORMAT_VERSION}")

        def arr(name: str, required: bool = True):
            f = path / name
            if not f.exists():
                if required:
                    raise InputError(f"{f}: missing")
                return None
            try:
                return np.load(f, mmap_mode="r" if (mmap and name == "images.npy") else None, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise InputError(f"{f}: unreadable array ({exc})") from exc

        ps = cls(
            images=arr("images.npy"),
            labels=arr("labels.npy"),
            class_names=list(header["class_names"]),
            slide_index=arr("slide_index.npy", required=False),
            slide_ids=list(header.get("slide_ids", [])),
            slide_labels={k: int(v) for k, v in header.get("slide_labels", {}).items()},
            coords=arr("coords.npy", required=False),
            kind=header.get("kind", "real"),
            meta=header.get("meta", {}),
        )
        ps.validate(where=str(path))
        return ps


def load_image_folder(root: str | Path, size: int | None = None, limit_per_class: int | None = None,
                      seed: int = 0) -> PatchSet:
    """Import ``root/CLASS/*.{png,jpg,...}`` (e.g. PCam's ``train/normal``) as a real patch set.

    Classes are the sub-folder names in sorted order (``normal`` < ``tumour``). ``size`` resizes
    (:func:`histodd_fed.preprocess.resize_images`, antialiased bilinear; the set records the view
    ``meta["view"]`` when every image had the same size); ``limit_per_class`` takes a seeded random
    subset per class. Without ``size`` the patches are as they sit on disk (all of one size).
    """
    from PIL import Image, UnidentifiedImageError

    from histodd_fed.preprocess import ViewSpec, resize_images

    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise InputError(f"{root}: no class sub-folders (expected ROOT/CLASS/*.png)")
    rng = np.random.default_rng(seed)
    images, labels, source_sizes = [], [], set()
    for ci, cname in enumerate(classes):
        files = sorted(p for p in (root / cname).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if limit_per_class is not None and len(files) > limit_per_class:
            files = [files[i] for i in sorted(rng.choice(len(files), limit_per_class, replace=False))]
        for f in files:
            try:
                with Image.open(f) as im:
                    a = np.asarray(im.convert("RGB"), dtype=np.uint8)
            except (OSError, UnidentifiedImageError) as exc:
                raise InputError(f"{f}: unreadable image ({exc})") from exc
            source_sizes.add(a.shape[:2])
            if size is not None and a.shape[:2] != (size, size):
                a = resize_images(a[None], size)[0]
            if images and a.shape != images[0].shape:
                raise InputError(f"{f}: size {a.shape[:2]} differs from {images[0].shape[:2]}; pass a size to resize")
            images.append(a)
            labels.append(ci)
    if not images:
        raise InputError(f"{root}: no images found under {classes}")
    meta: dict = {"source": str(root)}
    if size is not None and len(source_sizes) == 1:
        (h, w), = source_sizes
        if h == w and h != size:
            meta["view"] = ViewSpec.resize(h, size).to_dict()
    return PatchSet(images=np.stack(images), labels=np.asarray(labels), class_names=classes, kind="real",
                    meta=meta)
