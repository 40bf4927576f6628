"""One slide -> its patches, their labels and a thumbnail (:func:`tile_one_slide`); the batch around it
(inputs, resumable shards, worker processes, the store) is :mod:`.tiling`.

Open the slide (:mod:`.reader`), take the level-0 grid of square patches that cover
``patch_size`` pixels at the target resolution (``mpp`` um/px, or ``magnification``), read them
from the level with the largest downsample not exceeding the target and resize the remainder,
keep those whose tissue fraction (Otsu mask on a low-resolution thumbnail, :mod:`.tissue`) is at
least ``tissue_threshold``, and label them:

- tumour slide with annotations (ASAP XML or GeoJSON named ``<slide_id>.xml|.geojson|.json`` in
  ``annotations_dir``, else next to the slide, else in ``annotations/`` beside the slide or the
  manifest): a patch is ``tumour`` if at least ``tumour_fraction`` of its area lies inside tumour
  polygons (minus exclusions), else ``normal``;
- tumour slide without annotations: every patch ``tumour`` (the slide label);
- normal slide: every patch ``normal`` (annotations, if any, are ignored);
- slide with no label in the manifest: by its annotations if it has some, else ``normal``; the
  slide stays out of ``slide_labels`` and is listed in ``meta["unlabelled"]``.

``seed`` drives the only random step: the optional per-slide subsample ``max_patches_per_slide``.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histodd_fed.errors import ConfigError, InputError
from histodd_fed.slides.annotations import find_annotation_file, rasterise, read_annotations
from histodd_fed.slides.manifest import SlideRecord
from histodd_fed.slides.reader import open_slide, select_level
from histodd_fed.slides.tissue import tissue_mask

MAX_STRIP_PX = 4096  # widest region read at once (level pixels)


@dataclass
class TileConfig:
    """Options of :func:`~histodd_fed.slides.tiling.tile_slides` that change what a slide's patches are."""

    patch_size: int = 256
    mpp: float | None = 2.0
    magnification: float | None = None
    tissue_threshold: float = 0.5
    tumour_fraction: float = 0.5
    slide_mpp: float | None = None
    max_patches_per_slide: int | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.patch_size < 4:
            raise ConfigError(f"patch_size must be >= 4, got {self.patch_size}")
        if self.magnification is not None:
            if self.magnification <= 0:
                raise ConfigError(f"magnification must be > 0, got {self.magnification}")
        elif self.mpp is None or self.mpp <= 0:
            raise ConfigError(f"mpp must be > 0, got {self.mpp}")
        for name in ("tissue_threshold", "tumour_fraction"):
            v = getattr(self, name)
            if not (0.0 <= v <= 1.0):
                raise ConfigError(f"{name} must be in [0, 1], got {v}")
        if self.max_patches_per_slide is not None and self.max_patches_per_slide < 1:
            raise ConfigError(f"max_patches_per_slide must be >= 1, got {self.max_patches_per_slide}")

    @property
    def target(self) -> dict[str, float | None]:
        if self.magnification is not None:
            return {"mpp": None, "magnification": self.magnification}
        return {"mpp": self.mpp, "magnification": None}


def _block_fraction(integral: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """Mean of a mask over boxes [x0,x1) x [y0,y1) (mask pixels) from its padded integral image."""
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    x0, x1 = np.clip(x0, 0, w), np.clip(np.maximum(x1, x0 + 1), 0, w)
    y0, y1 = np.clip(y0, 0, h), np.clip(np.maximum(y1, y0 + 1), 0, h)
    s = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return s / area


def _integral(mask: np.ndarray) -> np.ndarray:
    out = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.float64)
    out[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.float64), 0), 1)
    return out


def _mask_boxes(xs: np.ndarray, ys: np.ndarray, stride0: float, ds: float):
    return (np.floor(xs / ds).astype(np.int64), np.floor(ys / ds).astype(np.int64),
            np.ceil((xs + stride0) / ds).astype(np.int64), np.ceil((ys + stride0) / ds).astype(np.int64))


def _thumbnail_png(thumb: np.ndarray, mask: np.ndarray, xs, ys, labels, stride0: float, ds: float) -> bytes:
    from PIL import Image, ImageDraw
    from scipy import ndimage as ndi

    scale = max(1, int(np.ceil(512 / max(thumb.shape[1], 1))))
    img = Image.fromarray(thumb).resize((thumb.shape[1] * scale, thumb.shape[0] * scale), Image.Resampling.NEAREST)
    edge = mask & ~ndi.binary_erosion(mask)
    edge = np.kron(edge, np.ones((scale, scale), dtype=bool))
    a = np.asarray(img).copy()
    a[edge] = (0, 0, 255)
    img = Image.fromarray(a)
    draw = ImageDraw.Draw(img)
    k = scale / ds
    for x, y, lab in zip(xs, ys, labels):
        draw.rectangle([x * k, y * k, (x + stride0) * k - 1, (y + stride0) * k - 1],
                       outline=(220, 0, 0) if lab == 1 else (0, 170, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _resize(a: np.ndarray, size: int) -> np.ndarray:
    if a.shape[0] == size and a.shape[1] == size:
        return a
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(a))
    method = Image.Resampling.BOX if a.shape[0] > size else Image.Resampling.BILINEAR
    return np.asarray(im.resize((size, size), method), dtype=np.uint8)


def tile_one_slide(record: SlideRecord, cfg: TileConfig, ann_dirs: list[Path],
                   images_path: str | Path | None = None) -> dict[str, Any]:
    """Tile one slide. Returns arrays (``images``, ``labels``, ``coords``), ``thumbnail`` PNG bytes
    and ``info``. Raises :class:`InputError` for a slide that cannot be tiled (unreadable, no
    MPP, smaller than a patch, no tissue, annotation file that does not parse).

    Memory-bounded: the tissue mask comes from a strip-wise thumbnail, patches are read in strips
    of at most ``MAX_STRIP_PX`` level pixels by one patch, and with ``images_path`` the patches go
    straight into a ``.npy`` memory map there (``images`` is then that memory map).
    """
    with open_slide(record.path, cfg.slide_mpp) as sl:
        ds_target = sl.target_downsample(**cfg.target)
        w0, h0 = sl.dimensions
        stride0 = cfg.patch_size * ds_target  # level-0 pixels per patch side
        level = select_level(sl.level_downsamples, ds_target)
        level_ds = sl.level_downsamples[level]
        read_px = max(1, int(round(stride0 / level_ds)))
        nx, ny = int(w0 // stride0), int(h0 // stride0)
        if nx == 0 or ny == 0:
            raise InputError(f"{record.path}: slide ({w0}x{h0} px) is smaller than one patch "
                             f"({stride0:.0f} level-0 px at the requested resolution)")
        # tissue mask on a thumbnail where a patch covers ~8x8 pixels
        thumb, mask_ds = sl.thumbnail(max(1.0, stride0 / 8.0))
        mask, otsu_t = tissue_mask(thumb)
        gx, gy = np.meshgrid(np.arange(nx), np.arange(ny))
        xs = np.round(gx.ravel() * stride0).astype(np.int64)
        ys = np.round(gy.ravel() * stride0).astype(np.int64)
        tissue_frac = _block_fraction(_integral(mask), *_mask_boxes(xs, ys, stride0, mask_ds))
        keep = tissue_frac >= cfg.tissue_threshold
        if not keep.any():
            raise InputError(f"{record.path}: no tissue found (none of the {nx * ny} patches has tissue fraction "
                             f">= {cfg.tissue_threshold:g}; Otsu saturation threshold {otsu_t:.3f})")
        # labels
        ann_file = find_annotation_file(record.slide_id, ann_dirs) if record.label != "normal" else None
        polys = [p for p in read_annotations(ann_file)] if ann_file else []
        if not any(p.label == "tumour" for p in polys):
            polys = []
        if polys:
            ann_ds = max(1.0, stride0 / 16.0)
            tmask = rasterise(polys, (int(np.ceil(w0 / ann_ds)), int(np.ceil(h0 / ann_ds))), ann_ds)
            tfrac = _block_fraction(_integral(tmask), *_mask_boxes(xs, ys, stride0, ann_ds))
            labels = (tfrac >= cfg.tumour_fraction).astype(np.int64)
            source = "annotations"
        else:
            labels = np.full(len(xs), 1 if record.label == "tumour" else 0, dtype=np.int64)
            source = "slide_label" if record.label is not None else "unlabelled"
        idx = np.flatnonzero(keep)
        if cfg.max_patches_per_slide is not None and len(idx) > cfg.max_patches_per_slide:
            rng = np.random.default_rng([cfg.seed, zlib.crc32(record.slide_id.encode("utf-8"))])
            idx = np.sort(rng.choice(idx, cfg.max_patches_per_slide, replace=False))
        # read patches row by row, in strips of consecutive columns
        shape = (len(idx), cfg.patch_size, cfg.patch_size, 3)
        if images_path is not None:
            images = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=shape)
        else:
            images = np.empty(shape, dtype=np.uint8)
        cols, rows = gx.ravel()[idx], gy.ravel()[idx]
        max_cols = max(1, int(MAX_STRIP_PX // max(read_px, 1)))
        k = 0
        while k < len(idx):
            e = k + 1
            while (e < len(idx) and rows[e] == rows[k] and cols[e] == cols[e - 1] + 1 and e - k < max_cols):
                e += 1
            x_first = int(xs[idx[k]])
            y_row = int(ys[idx[k]])
            width_l = int(np.ceil((xs[idx[e - 1]] - x_first) / level_ds)) + read_px
            strip = sl.read_rgb(x_first, y_row, level, (width_l, read_px), contiguous=False)
            for j in range(k, e):
                off = int(round((xs[idx[j]] - x_first) / level_ds))
                images[j] = _resize(strip[:, off:off + read_px], cfg.patch_size)
            k = e
        png = _thumbnail_png(thumb, mask, xs[idx], ys[idx], labels[idx], stride0, mask_ds)
        info = {
            "slide_id": record.slide_id, "path": str(record.path), "label": record.label,
            "split": record.split, "centre": record.centre, "mpp": sl.mpp, "mpp_source": sl.mpp_source,
            "objective_power": sl.objective_power, "level": level, "level_downsample": level_ds,
            "target_downsample": ds_target, "grid": [nx, ny], "tissue_patches": int(keep.sum()),
            "patches": int(len(idx)), "tumour_patches": int(labels[idx].sum()), "label_source": source,
            "annotation_file": str(ann_file) if polys else None, "otsu_threshold": otsu_t,
        }
        return {"images": images, "labels": labels[idx], "coords": np.stack([xs[idx], ys[idx]], 1),
                "thumbnail": png, "info": info}
