"""Tiler throughput against a plain loop of OpenSlide ``read_region`` calls over the same grid.

Generates one large H&E-like pyramidal TIFF (``--size`` px square at 0.5 um/px, levels 1/4/16,
JPEG tiles; 20000 for the issue's 20k x 20k slide), about half of it tissue, then in one run:

- ``plain all``:  ``read_region`` + RGB conversion of every grid patch (no tissue filtering);
- ``plain kept``: the same loop over only the grid patches the tiler keeps;
- ``tiler``:      :func:`histodd_fed.slides.tiling.tile_slides` end to end (thumbnail, Otsu
  tissue mask, strip reads, shard, store written) with ``--workers 1`` and ``2`` over ``--copies``
  hard-linked copies of the slide (the tiler parallelises over slides);

and prints patches/s and the ratios tiler / plain (target: >= 0.8x the plain loop on one worker).
Patches are ``--patch-size`` px at ``--mpp`` (default 256 px at 0.5 um/px: level-0 reads).

    .venv/bin/python benchmarks/bench_tiling.py [--size 20000] [--patch-size 256] [--mpp 0.5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from histodd_fed.slides.pyramid import write_pyramid_tiff  # noqa: E402


def make_slide(path: Path, size: int, seed: int) -> Path:
    """A size x size H&E-like slide: smooth pink/purple tissue blobs on white glass, fine noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    lo = max(8, size // 256)
    field = rng.random((lo, lo)).astype(np.float32)
    big = np.asarray(Image.fromarray(field).resize((size, size), Image.Resampling.BICUBIC))
    tissue = big > np.quantile(field, 0.5)
    shade = np.asarray(Image.fromarray(rng.random((lo * 8, lo * 8)).astype(np.float32))
                       .resize((size, size), Image.Resampling.BILINEAR))
    img = np.empty((size, size, 3), np.uint8)
    img[...] = 242
    for c, (a, b) in enumerate(((200, 40), (110, 60), (190, 30))):
        ch = img[..., c]
        ch[tissue] = (a - b * shade[tissue]).astype(np.uint8)
    noise = rng.integers(-6, 7, size=(size, size, 1), dtype=np.int16)
    img = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    del big, shade, tissue, noise
    return write_pyramid_tiff(path, img, mpp=0.5, downsamples=(1, 4, 16), tile=256, compression="jpeg")


def plain_loop(path: Path, coords: np.ndarray, level: int, read_px: int, patch: int) -> float:
    """Seconds to read (and convert to RGB uint8) every patch at ``coords`` with read_region."""
    import openslide
    from PIL import Image

    out = np.empty((patch, patch, 3), np.uint8)
    t = time.perf_counter()
    with openslide.OpenSlide(str(path)) as s:
        for x, y in coords:
            im = s.read_region((int(x), int(y)), level, (read_px, read_px)).convert("RGB")
            if read_px != patch:
                im = im.resize((patch, patch), Image.Resampling.BOX)
            out[...] = np.asarray(im)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=20000, help="slide side in level-0 pixels")
    ap.add_argument("--patch-size", type=int, default=256)
    ap.add_argument("--mpp", type=float, default=0.5, help="target um/px (slide is 0.5 um/px)")
    ap.add_argument("--copies", type=int, default=2, help="slides (hard links of one file) for the worker runs")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from histodd_fed.logging_setup import configure_logging
    from histodd_fed.slides.reader import open_slide, select_level
    from histodd_fed.slides.tiling import tile_slides

    configure_logging(quiet=True)
    work = Path(tempfile.mkdtemp(prefix="bench_tiling."))
    try:
        t = time.perf_counter()
        slide = make_slide(work / "slides" / "big_000.tiff", args.size, args.seed)
        t_make = time.perf_counter() - t
        copies = [slide] + [slide.with_name(f"big_{i:03d}.tiff") for i in range(1, args.copies)]
        for c in copies[1:]:
            os.link(slide, c)
        print(f"slide {args.size}x{args.size} written in {t_make:.1f} s ({slide.stat().st_size / 1e6:.0f} MB)", flush=True)

        # warm-up (imports, OS file cache) so neither side pays it inside the timings
        tile_slides([slide], work / "warm", patch_size=args.patch_size, mpp=args.mpp, max_patches_per_slide=4)
        shutil.rmtree(work / "warm")
        # the tiler on one slide, one worker (also gives the kept grid)
        res = {}
        t = time.perf_counter()
        rep = tile_slides([slide], work / "store1", patch_size=args.patch_size, mpp=args.mpp, workers=1)
        res["tiler_1slide_s"] = time.perf_counter() - t
        info = rep.per_slide["big_000"]
        kept = np.load(work / "store1" / "coords.npy")
        nx, ny = info["grid"]
        stride0 = args.patch_size * info["target_downsample"]
        with open_slide(slide) as s:
            level = select_level(s.level_downsamples, info["target_downsample"])
            read_px = max(1, int(round(stride0 / s.level_downsamples[level])))
        gx, gy = np.meshgrid(np.arange(nx), np.arange(ny))
        grid = np.stack([np.round(gx.ravel() * stride0), np.round(gy.ravel() * stride0)], 1).astype(np.int64)
        res["grid_patches"], res["kept_patches"] = int(len(grid)), int(len(kept))
        res["plain_all_s"] = plain_loop(slide, grid, level, read_px, args.patch_size)
        res["plain_kept_s"] = plain_loop(slide, kept, level, read_px, args.patch_size)
        shutil.rmtree(work / "store1")
        res["plain_all_pps"] = len(grid) / res["plain_all_s"]
        res["plain_kept_pps"] = len(kept) / res["plain_kept_s"]
        res["tiler_1slide_pps"] = len(kept) / res["tiler_1slide_s"]
        print(f"grid {len(grid)} patches, kept (tissue) {len(kept)}; level {level}, read {read_px} px", flush=True)
        print(f"plain read_region, all grid : {res['plain_all_pps']:8.1f} patches/s", flush=True)
        print(f"plain read_region, kept only: {res['plain_kept_pps']:8.1f} patches/s", flush=True)
        print(f"tiler, 1 slide, 1 worker    : {res['tiler_1slide_pps']:8.1f} kept patches/s  "
              f"= {res['tiler_1slide_pps'] / res['plain_kept_pps']:.2f}x plain (kept)  "
              f"(grid positions decided/s: {len(grid) / res['tiler_1slide_s']:.1f} "
              f"= {len(grid) / res['tiler_1slide_s'] / res['plain_all_pps']:.2f}x plain all)", flush=True)
        for w in (int(x) for x in args.workers.split(",")):
            t = time.perf_counter()
            rep = tile_slides(copies, work / f"store_w{w}", patch_size=args.patch_size, mpp=args.mpp, workers=w)
            dt = time.perf_counter() - t
            pps = rep.n_patches / dt
            res[f"tiler_w{w}_s"], res[f"tiler_w{w}_pps"] = dt, pps
            print(f"tiler, {len(copies)} slides, {w} worker(s): {pps:8.1f} kept patches/s  "
                  f"= {pps / res['plain_kept_pps']:.2f}x plain (kept)", flush=True)
            shutil.rmtree(work / f"store_w{w}")
        res["ratio_tiler_vs_plain_kept"] = res["tiler_1slide_pps"] / res["plain_kept_pps"]
        res.update(size=args.size, patch_size=args.patch_size, mpp=args.mpp, copies=args.copies, cpus=os.cpu_count())
        if args.json is not None:
            args.json.write_text(json.dumps(res, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
