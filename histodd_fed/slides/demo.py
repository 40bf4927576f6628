"""Procedural H&E demo slides: the embedded default data of histodd-fed.

:func:`make_demo_centre` writes, for one simulated centre::

    OUT/slides.csv                  slide_id, path, label, centre, split
    OUT/slides/<id>.tiff            pyramidal tiled RGB TIFF (OpenSlide-readable, MPP in tags)
    OUT/annotations/<id>.xml        tumour polygons, ASAP XML (Camelyon16) - tumour slides only
    OUT/annotations/<id>.geojson    the same polygons, QuPath GeoJSON
    OUT/thumbnails/<id>.png         lowest level with the tumour outline drawn in
    OUT/run_config.json             the generator's full config

Tissue model (all sizes in micrometres, so they scale with ``mpp``): blobby tissue regions on a
white background; eosin-rich wavy stroma fibres; small round or spindle haematoxylin nuclei in
normal tissue. Tumour slides get 1-3 star-shaped tumour regions with denser, larger, irregular,
darker nuclei and more basophilic cytoplasm. Concentrations are rendered with the Beer-Lambert
stain model of :mod:`histodd_fed.slides.stains`, using the centre's preset. Smooth fields are
drawn at low resolution and upsampled; nuclei are stamped in vectorised batches. Same seed and
options -> same bytes.
"""

from __future__ import annotations

import csv
import io
import logging
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from histodd_fed.atomic import atomic_directory
from histodd_fed.errors import ConfigError
from histodd_fed.slides.annotations import Polygon, rasterise, write_asap_xml, write_geojson
from histodd_fed.slides.pyramid import downscale, write_pyramid_tiff
from histodd_fed.slides.stains import StainPreset, get_preset, render_rgb

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("slide_id", "path", "label", "centre", "split")


@dataclass
class DemoConfig:
    """Options of the demo-slide generator (sizes of level 0 in pixels)."""

    centre: str = "C1"
    n_slides: int = 10
    seed: int = 0
    width: int = 2048
    height: int = 1536
    mpp: float = 0.5
    downsamples: tuple[int, ...] = (1, 4, 16)
    tile: int = 256
    compression: str = "jpeg"
    quality: int = 90
    test_fraction: float = 0.3
    stain: StainPreset | None = None  # None: the centre's preset
    tumour_contrast: float = 1.0  # 1: the textbook tumour look; towards 0: tumour morphology fades into normal
    tumour_size: float = 1.0  # scale of the tumour regions' radius (0.3: micrometastasis-sized foci)
    tumour_regions: int = 3   # tumour slides get 1..tumour_regions regions

    def validate(self) -> None:
        if self.n_slides < 1:
            raise ConfigError(f"n_slides must be >= 1, got {self.n_slides}")
        if self.width < 64 or self.height < 64:
            raise ConfigError(f"slide size must be at least 64x64, got {self.width}x{self.height}")
        if not (0 < self.mpp <= 100):
            raise ConfigError(f"mpp must be in (0, 100], got {self.mpp}")
        if not (0 <= self.test_fraction < 1):
            raise ConfigError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        if not (0 < self.tumour_contrast <= 1.5):
            raise ConfigError(f"tumour_contrast must be in (0, 1.5], got {self.tumour_contrast}")
        if not (0.05 <= self.tumour_size <= 1.5):
            raise ConfigError(f"tumour_size must be in [0.05, 1.5], got {self.tumour_size}")
        if not (isinstance(self.tumour_regions, int) and 1 <= self.tumour_regions <= 10):
            raise ConfigError(f"tumour_regions must be an integer in [1, 10], got {self.tumour_regions!r}")


@dataclass
class DemoSlide:
    """One rendered slide: level-0 RGB, tumour polygons (level-0 px) and the tissue mask."""

    slide_id: str
    label: str
    rgb: np.ndarray
    polygons: list[Polygon] = field(default_factory=list)
    tissue: np.ndarray | None = None


# --------------------------------------------------------------------------- fields
def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Zero-mean unit-std smooth noise of ``shape`` (H, W) with feature size ~``cell`` px."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    h, w = shape
    step = max(1.0, cell / 4.0)
    lh, lw = max(4, int(np.ceil(h / step)) + 2), max(4, int(np.ceil(w / step)) + 2)
    low = gaussian_filter(rng.standard_normal((lh, lw)), sigma=2.0, mode="wrap")
    low = (low - low.mean()) / (low.std() + 1e-8)
    up = Image.fromarray(low.astype(np.float32), mode="F").resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(up, dtype=np.float32)


def _star_polygon(rng: np.random.Generator, cx: float, cy: float, radius: float, n: int = 48) -> np.ndarray:
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.ones(n)
    for k in (2, 3, 4, 5):
        r += rng.uniform(0.0, 0.14 / (k - 1) ** 0.5) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.round(np.stack([cx + radius * r * np.cos(theta), cy + radius * r * np.sin(theta)], 1), 2)


def _stamp_nuclei(shape: tuple[int, int], rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray,
                  radius: np.ndarray, aspect: np.ndarray, irregular: np.ndarray, intensity: np.ndarray,
                  chunk: int = 1500) -> np.ndarray:
    """Sum of soft-edged (irregular) elliptical nuclei, as a flat (H*W,) float array."""
    h, w = shape
    out = np.zeros(h * w, dtype=np.float64)
    if len(xs) == 0:
        return out
    angle = rng.uniform(0, np.pi, len(xs)).astype(np.float32)
    lobes = rng.integers(2, 4, len(xs)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, len(xs)).astype(np.float32)
    # group nuclei by the stamp window they need, so small nuclei use small windows
    need = np.ceil(radius * aspect * (1 + irregular)).astype(np.int64) + 1
    need = 2 * ((need + 1) // 2)
    for k in np.unique(need):
        members = np.flatnonzero(need == k)
        off = np.arange(-k, k + 1, dtype=np.float32)
        gy, gx = np.meshgrid(off, off, indexing="ij")
        for s in range(0, len(members), chunk):
            sl = members[s:s + chunk]
            cx, cy = np.round(xs[sl]), np.round(ys[sl])
            u = gx[None] - (xs[sl] - cx).astype(np.float32)[:, None, None]
            v = gy[None] - (ys[sl] - cy).astype(np.float32)[:, None, None]
            c, sn = np.cos(angle[sl])[:, None, None], np.sin(angle[sl])[:, None, None]
            ur, vr = (u * c + v * sn) / aspect[sl][:, None, None], v * c - u * sn
            rho = np.sqrt(ur * ur + vr * vr)
            theta = np.arctan2(vr, ur)
            rr = radius[sl][:, None, None] * (1 + irregular[sl][:, None, None]
                                              * np.cos(lobes[sl][:, None, None] * theta + phase[sl][:, None, None]))
            val = np.clip(rr - rho + 0.5, 0.0, 1.0) * intensity[sl][:, None, None]
            val *= 0.75 + 0.5 * rng.random(val.shape, dtype=np.float32)  # chromatin texture
            iy = cy.astype(np.int64)[:, None, None] + gy.astype(np.int64)[None]
            ix = cx.astype(np.int64)[:, None, None] + gx.astype(np.int64)[None]
            ok = (val > 0) & (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
            out += np.bincount((iy * w + ix)[ok], weights=val[ok], minlength=h * w)
    return out


def _sample_in(mask: np.ndarray, rng: np.random.Generator, n_expected: float) -> tuple[np.ndarray, np.ndarray]:
    """Poisson-many uniform points (x, y) inside ``mask`` (expected count ``n_expected``)."""
    h, w = mask.shape
    frac = max(mask.mean(), 1e-6)
    n_cand = rng.poisson(n_expected / frac) if n_expected > 0 else 0
    xs, ys = rng.uniform(0, w, n_cand), rng.uniform(0, h, n_cand)
    keep = mask[ys.astype(np.int64), xs.astype(np.int64)]
    return xs[keep], ys[keep]


# --------------------------------------------------------------------------- one slide
def render_demo_slide(rng: np.random.Generator, slide_id: str, label: str, preset: StainPreset,
                      width: int = 2048, height: int = 1536, mpp: float = 0.5,
                      tumour_contrast: float = 1.0, tumour_size: float = 1.0,
                      tumour_regions: int = 3) -> DemoSlide:
    """Render one H&E-like slide at level 0 (``label`` is ``normal`` or ``tumour``).

    ``tumour_contrast`` scales every way tumour differs from normal tissue (eosin loss, basophilic
    cytoplasm, nuclear density, size, irregularity and darkness): 1 is the default, clearly visible
    tumour; 0.3 makes tumour a subtle shift of the normal nuclei (a harder task at 32 px).
    A tumour slide gets 1..``tumour_regions`` regions of radius ``tumour_size`` x 12-22% of the slide's
    short side (1: macro-metastases; ~0.3: small foci, a harder slide-level task).
    """
    c = float(tumour_contrast)

    def towards(normal: float, tumour: float) -> float:
        """``tumour`` at contrast 1 (exactly), else the normal value moved ``c`` of the way."""
        return tumour if c == 1.0 else normal + c * (tumour - normal)
    from scipy.ndimage import distance_transform_edt

    if label not in ("normal", "tumour"):
        raise ConfigError(f"slide label must be normal or tumour, got {label!r}")
    h, w = height, width
    um = 1.0 / mpp  # pixels per micrometre
    # ---- tissue: smooth field + a bias towards the slide's centre, thresholded at a quantile
    f = _smooth_field(rng, (h, w), cell=min(h, w) / 3.0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
    f = f + 2.2 * (1.0 - r2)
    t = np.quantile(f[::8, ::8], 1.0 - rng.uniform(0.45, 0.65))
    tissue_soft = np.clip((f - t) * 25.0 + 0.5, 0.0, 1.0)
    tissue = tissue_soft > 0.5

    # ---- tumour regions: star polygons centred well inside the tissue
    polygons: list[Polygon] = []
    tumour = np.zeros((h, w), dtype=bool)
    if label == "tumour":
        step = 8
        dist = distance_transform_edt(tissue[::step, ::step]) * step
        for _ in range(int(rng.integers(1, int(tumour_regions) + 1))):
            radius = rng.uniform(0.12, 0.22) * float(tumour_size) * min(h, w)
            ok = np.argwhere(dist > radius * 0.9)
            if len(ok) == 0:
                ok = np.argwhere(dist >= dist.max() * 0.8)
            cy, cx = ok[rng.integers(len(ok))] * step + step / 2
            polygons.append(Polygon(_star_polygon(rng, float(cx), float(cy), radius)))
        tumour = rasterise(polygons, (w, h), 1.0)
        tissue_soft = np.maximum(tissue_soft, tumour.astype(np.float32))
        tissue = tissue | tumour

    # ---- stroma: wavy eosin fibres (period ~7 um), patchy density
    alpha = rng.uniform(0, np.pi)
    warp = _smooth_field(rng, (h, w), cell=50 * um)
    period = rng.uniform(6.0, 8.0) * um
    fibres = np.sin((xx * np.cos(alpha) + yy * np.sin(alpha)) * (2 * np.pi / period) + 9.0 * warp)
    patch = _smooth_field(rng, (h, w), cell=30 * um)
    e = tissue_soft * (0.42 + 0.16 * fibres * (patch > -0.4)) * (0.9 + 0.15 * patch)
    hb = tissue_soft * 0.07
    if label == "tumour":
        e = np.where(tumour, e * towards(1.0, 0.55), e)
        hb = hb + tumour * towards(0.0, 0.22)

    # ---- nuclei
    normal_area = tissue & ~tumour
    n_norm = normal_area.sum() / (11.0 * um) ** 2
    xs, ys = _sample_in(normal_area, rng, n_norm)
    n = len(xs)
    spindle = rng.random(n) < 0.35
    radius = np.where(spindle, rng.normal(1.6, 0.2, n), rng.normal(2.3, 0.35, n)).clip(1.0) * um
    aspect = np.where(spindle, rng.uniform(2.0, 3.2, n), rng.uniform(1.0, 1.35, n))
    nuc = _stamp_nuclei((h, w), rng, xs, ys, radius.astype(np.float32), aspect.astype(np.float32),
                        rng.uniform(0.0, 0.06, n).astype(np.float32),
                        rng.normal(1.0, 0.12, n).clip(0.6).astype(np.float32))
    if label == "tumour":
        xs, ys = _sample_in(tumour, rng, tumour.sum() / (towards(11.0, 8.5) * um) ** 2)
        n = len(xs)
        nuc += _stamp_nuclei((h, w), rng, xs, ys,
                             (rng.normal(towards(2.3, 3.5), towards(0.35, 0.6), n).clip(towards(1.0, 2.2))
                              * um).astype(np.float32),
                             rng.uniform(1.0, towards(1.35, 1.6), n).astype(np.float32),
                             rng.uniform(towards(0.0, 0.05), towards(0.06, 0.2), n).astype(np.float32),
                             rng.normal(towards(1.0, 1.45), towards(0.12, 0.18), n).clip(towards(0.6, 0.9))
                             .astype(np.float32))
    hmap = hb + np.minimum(nuc.reshape(h, w), 2.4).astype(np.float32)
    e = e * (1.0 - 0.6 * np.minimum(nuc.reshape(h, w), 1.0)).astype(np.float32)

    scale = tuple(1.0 + preset.jitter * rng.uniform(-1, 1, 2))
    rgb = render_rgb(hmap.astype(np.float32), e.astype(np.float32), preset, rng, scale=scale)
    return DemoSlide(slide_id=slide_id, label=label, rgb=rgb, polygons=polygons, tissue=tissue)


# --------------------------------------------------------------------------- a centre
def demo_slide_table(centre: str, n_slides: int, test_fraction: float = 0.3) -> list[dict[str, str]]:
    """Slide ids, labels (alternating tumour/normal) and splits (last ~30% of each label -> test).

    With ``n_slides >= 4`` both labels occur in both splits.
    """
    rows = [{"slide_id": f"{centre}_{i:03d}", "label": "tumour" if i % 2 == 0 else "normal",
             "centre": centre, "split": "train"} for i in range(n_slides)]
    for lab in ("tumour", "normal"):
        group = [r for r in rows if r["label"] == lab]
        n_test = max(1, int(round(test_fraction * len(group)))) if len(group) >= 2 and test_fraction > 0 else 0
        for r in group[len(group) - n_test:]:
            r["split"] = "test"
    return rows


def _thumbnail_png(rgb_low: np.ndarray, polygons: list[Polygon], downsample: float) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.fromarray(rgb_low)
    draw = ImageDraw.Draw(img)
    for p in polygons:
        pts = [(float(x) / downsample, float(y) / downsample) for x, y in p.points]
        draw.line(pts + pts[:1], fill=(0, 160, 0) if p.label == "tumour" else (0, 0, 200), width=1)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_demo_centre(out_dir: str | Path, centre: str = "C1", n_slides: int = 10, seed: int = 0, *,
                     width: int = 2048, height: int = 1536, mpp: float = 0.5,
                     downsamples: tuple[int, ...] = (1, 4, 16), tile: int = 256,
                     compression: str = "jpeg", quality: int = 90, test_fraction: float = 0.3,
                     stain: StainPreset | None = None, tumour_contrast: float = 1.0,
                     tumour_size: float = 1.0, tumour_regions: int = 3) -> Path:
    """Write a simulated centre's demo slides to ``out_dir`` and return the ``slides.csv`` path.

    The directory is written atomically (temp + rename); an existing non-empty ``out_dir``
    without a ``slides.csv`` is refused rather than replaced.
    """
    from histodd_fed.logging_setup import progress
    from histodd_fed.runconfig import write_run_config

    cfg = DemoConfig(centre=centre, n_slides=n_slides, seed=seed, width=width, height=height, mpp=mpp,
                     downsamples=tuple(downsamples), tile=tile, compression=compression, quality=quality,
                     test_fraction=test_fraction, stain=stain, tumour_contrast=tumour_contrast,
                     tumour_size=tumour_size, tumour_regions=tumour_regions)
    cfg.validate()
    preset = stain or get_preset(centre)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "slides.csv").exists():
        raise ConfigError(f"{out_dir}: exists, is not empty and is not a demo centre; refusing to replace it")
    rows = demo_slide_table(centre, n_slides, test_fraction)
    centre_key = zlib.crc32(centre.encode("utf-8"))
    with atomic_directory(out_dir) as tmp:
        for i, row in enumerate(progress(rows, desc=f"demo slides {centre}", unit="slide")):
            rng = np.random.default_rng([seed, centre_key, i])
            s = render_demo_slide(rng, row["slide_id"], row["label"], preset, width, height, mpp, tumour_contrast,
                                  tumour_size, tumour_regions)
            desc = f"histodd-fed demo slide {s.slide_id} centre={centre} label={s.label} mpp={mpp}"
            write_pyramid_tiff(tmp / "slides" / f"{s.slide_id}.tiff", s.rgb, mpp, downsamples, tile,
                               compression, quality, description=desc)
            if s.label == "tumour":
                write_asap_xml(tmp / "annotations" / f"{s.slide_id}.xml", s.polygons)
                write_geojson(tmp / "annotations" / f"{s.slide_id}.geojson", s.polygons)
            low = downscale(s.rgb, int(downsamples[-1]))
            (tmp / "thumbnails").mkdir(exist_ok=True)
            (tmp / "thumbnails" / f"{s.slide_id}.png").write_bytes(_thumbnail_png(low, s.polygons, downsamples[-1]))
            row["path"] = f"slides/{s.slide_id}.tiff"
        buf = io.StringIO()
        wr = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        wr.writeheader()
        for row in rows:
            wr.writerow({k: row[k] for k in MANIFEST_COLUMNS})
        (tmp / "slides.csv").write_text(buf.getvalue())
        conf = asdict(cfg)
        conf["stain"] = asdict(preset)
        write_run_config(tmp, "make-demo-slides", conf)
    log.info("wrote %d demo slides for centre %s to %s", n_slides, centre, out_dir)
    return out_dir / "slides.csv"
