"""Write pyramidal tiled RGB TIFFs that OpenSlide opens with all levels and the right MPP.

Layout (what OpenSlide's generic-TIFF reader needs): every level is its own tiled page in the
main IFD chain, pages after the first carry ``NewSubfileType = 1`` (reduced resolution), and
X/Y resolution tags are in CENTIMETER, so ``openslide.mpp-x`` is exact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from histodd_fed.errors import ConfigError


def downscale(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Area-average ``rgb`` (H, W, 3 uint8) by an integer ``factor`` (size rounded up)."""
    if factor == 1:
        return rgb
    from PIL import Image

    h, w = rgb.shape[:2]
    size = (max(1, -(-w // factor)), max(1, -(-h // factor)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))


def write_pyramid_tiff(path: str | Path, level0: np.ndarray, mpp: float,
                       downsamples: Sequence[int] = (1, 4, 16), tile: int = 256,
                       compression: str = "jpeg", quality: int = 90, description: str = "") -> Path:
    """Write ``level0`` (H, W, 3 uint8) and its downsampled levels to ``path`` atomically.

    ``downsamples`` must start at 1 and increase; ``compression`` is ``jpeg``, ``deflate`` or
    ``none``. The same inputs give the same bytes (no timestamps are written).
    """
    import tifffile

    ds = [int(d) for d in downsamples]
    if not ds or ds[0] != 1 or any(b <= a for a, b in zip(ds, ds[1:])):
        raise ConfigError(f"downsamples must start at 1 and increase, got {list(downsamples)}")
    if tile % 16:
        raise ConfigError(f"tile size must be a multiple of 16, got {tile}")
    comp = {"jpeg": ("jpeg", {"level": int(quality)}), "deflate": ("zlib", {"level": 6}),
            "none": (None, None)}.get(compression)
    if comp is None:
        raise ConfigError(f"compression must be jpeg, deflate or none, got {compression!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    px_per_cm = 1e4 / mpp
    try:
        with tifffile.TiffWriter(tmp, bigtiff=level0.nbytes > 2**31) as tw:
            for i, d in enumerate(ds):
                img = downscale(level0, d)
                tw.write(
                    img,
                    photometric="rgb",
                    tile=(tile, tile),
                    compression=comp[0],
                    compressionargs=comp[1],
                    resolution=(px_per_cm / d, px_per_cm / d),
                    resolutionunit="CENTIMETER",
                    subfiletype=0 if i == 0 else 1,
                    description=description if i == 0 and description else None,
                    metadata=None,
                    software=False,
                )
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
