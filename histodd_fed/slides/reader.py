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

    def require_mpp(self) -> float:
        if self.mpp is None:
            raise InputError(f"{self.path}: slide has no microns-per-pixel metadata; pass --slide-mpp "
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
            return mpp / self.require_mpp()
        if self.objective_power and self.mpp_source == "metadata":
            return self.objective_power / magnification
        return (10.0 / magnification) / self.require_mpp()

    def read_rgb(self, x0: int, y0: int, level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) of ``size=(w, h)`` at ``level``; (x0, y0) in level-0 pixels.

        Transparent pixels (outside the scanned area) become white.
        """
        try:
            im = self.handle.read_region((int(x0), int(y0)), int(level), (int(size[0]), int(size[1])))
        except Exception as exc:  # openslide.OpenSlideError and friends
            raise InputError(f"{self.path}: read failed at ({x0},{y0}) level {level} ({exc})") from exc
        a = np.asarray(im, dtype=np.uint8)
        rgb, alpha = a[..., :3].astype(np.uint32), a[..., 3:4].astype(np.uint32)
        # openslide-python returns straight (not premultiplied) RGBA: composite over white
        return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)

    def thumbnail(self, downsample: float) -> tuple[np.ndarray, float]:
        """An RGB image of the whole slide at about ``downsample`` (actual x-downsample returned)."""
        w, h = self.dimensions
        size = (max(1, int(round(w / downsample))), max(1, int(round(h / downsample))))
        try:
            im = self.handle.get_thumbnail(size).convert("RGB")
        except Exception as exc:
            raise InputError(f"{self.path}: thumbnail failed ({exc})") from exc
        a = np.asarray(im, dtype=np.uint8)
        return a, w / a.shape[1]

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
    if slide_mpp is not None and not (0 < slide_mpp < 1000):
        raise InputError(f"{path}: --slide-mpp must be a positive number, got {slide_mpp}")
    try:
        handle = openslide.open_slide(str(path))
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
