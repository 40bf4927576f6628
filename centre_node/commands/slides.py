"""`centre-node` commands for slides: make-demo-slides, tile, slide-info."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("make-demo-slides")(make_demo_slides)
    app.command("tile")(tile)
    app.command("slide-info")(slide_info)


def make_demo_slides(
    out: Path = typer.Option(..., "--out", help="Folder to write the centre's slides, annotations and slides.csv."),
    centre: str = typer.Option("C1", "--centre", help="Centre (stain preset): C1 ... C5."),
    n_slides: int = typer.Option(10, "--n-slides", help="Number of slides (tumour/normal alternate)."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed gives the same bytes."),
    width: int = typer.Option(2048, "--width", help="Level-0 width in pixels."),
    height: int = typer.Option(1536, "--height", help="Level-0 height in pixels."),
    mpp: float = typer.Option(0.5, "--mpp", help="Level-0 microns per pixel."),
    compression: str = typer.Option("jpeg", "--compression", help="Tile compression: jpeg, deflate or none."),
) -> None:
    """Write procedurally generated H&E demo slides (pyramidal TIFF + tumour annotations) for one centre."""
    from histodd_fed.slides.demo import make_demo_centre

    manifest = make_demo_centre(out, centre=centre, n_slides=n_slides, seed=seed, width=width, height=height,
                                mpp=mpp, compression=compression)
    typer.echo(f"wrote {n_slides} slides for centre {centre}: {manifest}")


def tile(
    slides: Optional[Path] = typer.Option(None, "--slides", help="A slide folder, one slide file, or a slides.csv manifest."),
    patches: Optional[Path] = typer.Option(None, "--patches", help="Instead of slides: an already-tiled folder CLASS/*.png|jpg (PCam layout)."),
    out: Path = typer.Option(..., "--out", help="Patch store (PatchSet folder) to write."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="slides.csv with slide_id,path,label,centre,split."),
    annotations: Optional[Path] = typer.Option(None, "--annotations", help="Folder of <slide_id>.xml|.geojson tumour annotations."),
    patch_size: Optional[int] = typer.Option(None, "--patch-size", help="Patch side in pixels at the target resolution (slides: default 256; --patches: default keep, else resize)."),
    mpp: float = typer.Option(2.0, "--mpp", help="Target microns per pixel."),
    magnification: Optional[float] = typer.Option(None, "--magnification", help="Target magnification (overrides --mpp)."),
    tissue_threshold: float = typer.Option(0.5, "--tissue-threshold", help="Minimum tissue fraction of a kept patch."),
    tumour_fraction: float = typer.Option(0.5, "--tumour-fraction", help="Minimum annotated-tumour fraction of a tumour patch."),
    workers: int = typer.Option(1, "--workers", help="Worker processes."),
    slide_mpp: Optional[float] = typer.Option(None, "--slide-mpp", help="Level-0 microns per pixel for slides without (or with wrong) metadata."),
    max_patches_per_slide: Optional[int] = typer.Option(None, "--max-patches-per-slide", help="Seeded random subsample per slide (--patches: per class)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the subsample."),
    strict: bool = typer.Option(False, "--strict", help="Fail (exit 2, store not written) if any slide is skipped."),
) -> None:
    """Tile whole-slide images (or import a tiled patch folder) into one patch store; prints a summary table.

    Bad slides are reported one line each and skipped; the exit status is non-zero only when no
    slide could be tiled, or with --strict when any was skipped.
    """
    from histodd_fed.errors import InputError
    from histodd_fed.slides.tiling import format_summary, tile_patches, tile_slides

    if (slides is None) == (patches is None):
        raise InputError("give exactly one of --slides (whole-slide images) or --patches (a CLASS/*.png folder)")
    if patches is not None:
        rep = tile_patches(patches, out, patch_size=patch_size, limit_per_class=max_patches_per_slide, seed=seed)
    else:
        rep = tile_slides(slides, out, labels_csv=labels, annotations_dir=annotations,
                          patch_size=256 if patch_size is None else patch_size, mpp=mpp,
                          magnification=magnification, tissue_threshold=tissue_threshold, workers=workers,
                          slide_mpp=slide_mpp, tumour_fraction=tumour_fraction, seed=seed,
                          max_patches_per_slide=max_patches_per_slide, strict=strict)
    typer.echo(format_summary(rep))


def slide_info(
    slide: Path = typer.Argument(..., help="A slide file."),
    slide_mpp: Optional[float] = typer.Option(None, "--slide-mpp", help="Override level-0 microns per pixel."),
) -> None:
    """Print a slide's levels, downsamples and resolution as OpenSlide sees them."""
    from histodd_fed.slides.reader import open_slide

    with open_slide(slide, slide_mpp) as s:
        typer.echo(f"{slide}: {s.dimensions[0]}x{s.dimensions[1]} px, mpp {s.mpp} ({s.mpp_source}), "
                   f"objective {s.objective_power}")
        for i, (dim, ds) in enumerate(zip(s.level_dimensions, s.level_downsamples)):
            typer.echo(f"  level {i}: {dim[0]}x{dim[1]} downsample {ds:g}")
