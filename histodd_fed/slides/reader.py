"""Opening slides with OpenSlide: microns per pixel, objective power, level choice, reading.

Everything OpenSlide reads (SVS, TIFF, NDPI, MRXS, ...) is opened natively; plain PNG/JPEG/TIFF
images fall back to OpenSlide's ``ImageSlide`` (one level, no MPP). A slide without MPP metadata
needs an explicit ``slide_mpp``: the MPP is never guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histodd_fed.errors import InputError

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
                  ".dcm", ".png", ".jpg", ".jpeg")


def select_level(level_downsamples, target_downsample: float, tolerance: float = 1e-3) -> int:
    """The level with the largest downsample not exceeding ``target_downsample`` (level 0 if none)."""
    best, best_ds = 0, -math.inf
    for i, d in enumerate(level_downsamples):
        if d <= target_downsample * (1 + tolerance) and d > best_ds:
            best, best_ds = i, d
    return best


@dataclass
class OpenedSlide:
    """An open slide with its resolution resolved. Use as a context manager."""

    path: Path
    handle: object  # openslide.AbstractSlide
    mpp: float | None
    mpp_source: str  # "metadata" | "user" | "none"
    objective_power: float | None

    @property
    def level_count(self) -> int:
        return self.handle.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(self.handle.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self.handle.level_downsamples)

    @property
    def dimensions(self) -> tuple[int, int]:
        return tuple(self.handle.dimensions)

    def require_mpp(self, asked: str = "") -> float:
        """Level-0 MPP, or an :class:`InputError` naming the file (``asked`` says what needed it)."""
        if self.mpp is None:
            why = f" (needed for {asked})" if asked else ""
            raise InputError(f"{self.path}: slide has no microns-per-pixel metadata{why}; pass --slide-mpp "
                             f"(e.g. 0.25 for 40x, 0.5 for 20x) - the resolution is never guessed")
        return self.mpp

    def target_downsample(self, mpp: float | None = None, magnification: float | None = None) -> float:
        """Level-0 downsample for a target MPP, or for a target magnification.

        Magnification uses the objective power when the slide has one (``power / mag``), else
        the MPP with the convention ``mpp = 10 / magnification`` (20x = 0.5 um/px).
        """
        if (mpp is None) == (magnification is None):
            raise InputError("give exactly one of mpp or magnification")
        if mpp is not None:
            return mpp / self.require_mpp(f"--mpp {mpp:g}")
        if self.objective_power and self.mpp_source == "metadata":
            return self.objective_power / magnification
        return (10.0 / magnification) / self.require_mpp(f"--magnification {magnification:g}")

    def read_rgb(self, x0: int, y0: int, level: int, size: tuple[int, int], contiguous: bool = True) -> np.ndarray:
        """RGB uint8 (h, w, 3) of ``size=(w, h)`` at ``level``; (x0, y0) in level-0 pixels.

        Transparent pixels (outside the scanned area) become white. ``contiguous=False`` may
        return a strided view of the RGBA buffer (saves a copy when the caller copies anyway).
        """
        try:
            im = self.handle.read_region((int(x0), int(y0)), int(level), (int(size[0]), int(size[1])))
        except Exception as exc:  # openslide.OpenSlideError and friends
            raise InputError(f"{self.path}: read failed at ({x0},{y0}) level {level} ({exc})") from exc
        a = np.asarray(im, dtype=np.uint8)
        if a.ndim == 3 and a.shape[-1] == 4 and a[..., 3].min(initial=255) == 255:
            return np.ascontiguousarray(a[..., :3]) if contiguous else a[..., :3]  # fully opaque (the usual case): no compositing
        rgb, alpha = a[..., :3].astype(np.uint32), a[..., 3:4].astype(np.uint32)
        # openslide-python returns straight (not premultiplied) RGBA: composite over white
        return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)

    def thumbnail(self, downsample: float, max_strip_bytes: int = 16 << 20) -> tuple[np.ndarray, float]:
        """An RGB image of the whole slide at about ``downsample`` (actual x-downsample returned).

        Memory-bounded: reads the level with the largest downsample not above ``downsample`` in
        horizontal strips of at most ``max_strip_bytes`` (RGBA) and box-filters each strip down,
        so a slide without a pyramid is never held whole in memory (unlike
        ``openslide.get_thumbnail``, which reads the whole level at once).
        """
        from PIL import Image

        w, h = self.dimensions
        tw, th = max(1, int(round(w / downsample))), max(1, int(round(h / downsample)))
        level = select_level(self.level_downsamples, max(1.0, w / tw))
        lw, lh = self.level_dimensions[level]
        lds = self.level_downsamples[level]
        sy = lh / th  # level rows per thumbnail row
        rows_per_strip = max(1, int(max_strip_bytes // max(1, lw * 4) / max(sy, 1e-9)))
        out = np.empty((th, tw, 3), dtype=np.uint8)
        r0 = 0
        while r0 < th:
            r1 = min(th, r0 + rows_per_strip)
            a = int(np.floor(r0 * sy))
            b = min(lh, max(a + 1, int(np.ceil(r1 * sy))))
            strip = self.read_rgb(0, int(round(a * lds)), level, (lw, b - a))
            im = Image.fromarray(strip).resize((tw, r1 - r0), Image.Resampling.BOX,
                                               box=(0.0, r0 * sy - a, float(lw), min(r1 * sy, lh) - a))
            out[r0:r1] = np.asarray(im, dtype=np.uint8)
            r0 = r1
        return out, w / tw

    def close(self) -> None:
        try:
            self.handle.close()
        except Exception:  # pragma: no cover - closing never matters for correctness
            pass

    def __enter__(self) -> "OpenedSlide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _float_prop(props, key: str) -> float | None:
    v = props.get(key)
    try:
        f = float(v) if v not in (None, "") else None
    except ValueError:
        return None
    return f if f is not None and math.isfinite(f) and f > 0 else None


def open_slide(path: str | Path, slide_mpp: float | None = None) -> OpenedSlide:
    """Open ``path`` with OpenSlide (ImageSlide fallback for plain images).

    ``slide_mpp`` overrides (or supplies missing) microns per pixel at level 0.
    Raises :class:`InputError` naming the file when it cannot be opened.
    """
    import openslide
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such slide file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes), not a slide")
    if slide_mpp is not None and not (0 < slide_mpp < 1000):
        raise InputError(f"{path}: --slide-mpp must be a positive number, got {slide_mpp}")
    try:
        native = openslide.OpenSlide.detect_format(str(path)) is not None
    except (openslide.OpenSlideError, OSError, ValueError):
        native = False
    try:
        if native:
            handle = openslide.OpenSlide(str(path))
        else:
            # plain image (PNG/JPEG/untiled TIFF): decode it fully now, so that a truncated or
            # corrupt file fails here with a clear message, not later as "no MPP" or a read error
            with open(path, "rb") as fh:
                magic = fh.read(4)
            img = Image.open(path)
            try:
                img.load()
            except (OSError, ValueError) as exc:
                kind = "TIFF" if magic[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+") else img.format or "image"
                raise InputError(f"{path}: truncated or corrupt {kind} ({exc})") from exc
            handle = openslide.ImageSlide(img)
    except InputError:
        raise
    except (openslide.OpenSlideError, UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable slide ({type(exc).__name__}: {exc})") from exc
    props = handle.properties
    mpp = _float_prop(props, openslide.PROPERTY_NAME_MPP_X)
    power = _float_prop(props, openslide.PROPERTY_NAME_OBJECTIVE_POWER)
    if slide_mpp is not None:
        mpp, source = float(slide_mpp), "user"
    else:
        source = "metadata" if mpp is not None else "none"
    return OpenedSlide(path=path, handle=handle, mpp=mpp, mpp_source=source, objective_power=power)


def list_slide_files(folder: str | Path) -> list[Path]:
    """Slide-like files directly in ``folder`` (by suffix), sorted by name; hidden files skipped."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in SLIDE_SUFFIXES)
