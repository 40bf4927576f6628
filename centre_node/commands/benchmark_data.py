"""`centre-node` commands that build benchmark centres from the shared real data: make-pcam-centres."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from histodd_fed.errors import ConfigError

if TYPE_CHECKING:
    from histodd_fed.datasets.pseudo_slides import SlideSpec


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("make-pcam-centres")(make_pcam_centres)


def make_pcam_centres(
    pcam: Path = typer.Option(..., "--pcam", help="PCam folder with train/ and valid/ (CLASS/*.jpg), e.g. ../shared/data/pcam-ai4all."),
    stains: Path = typer.Option(..., "--stains", help="Camelyon17 stain tiles domain_<centre>_<id>.png, e.g. ../shared/data/camelyon17-stain-tiles."),
    out: Path = typer.Option(..., "--out", help="Folder for the centres, manifest.json, centres.png."),
    hospitals: Optional[str] = typer.Option(None, "--hospitals", help="One centre per Camelyon17 domain, e.g. 0,1,2,3,4: H<d>/source (its disjoint share of PCam train, all of it) and H<d>/target/{train,test} (its share of PCam valid), both re-stained to domain d. For coordinator transfer --sources/--target."),
    target_domain: Optional[int] = typer.Option(None, "--target-domain", help="The older two-centre layout (default without --hospitals: 2): C1 = PCam train as is, C2 = PCam valid re-stained to this Camelyon17 domain (0-4)."),
    target_train_per_class: int = typer.Option(50, "--target-train-per-class", help="Labelled train patches per class of each target; the rest of its share is its test set."),
    seed: int = typer.Option(0, "--seed", help="Seed of the shares, the split, the jitter and any --limit subset."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use at most this many PCam patches per class and split (tests, quick looks)."),
    jitter: bool = typer.Option(True, "--jitter/--no-jitter", help="Per-patch stain jitter from the spread across the centre's tiles."),
    slides: bool = typer.Option(True, "--slides/--no-slides", help="With --hospitals: pseudo-slides (bags of one split's patches) beside each split, for the slide columns (docs/federation.md 'Pseudo-slides')."),
    slide_patches: str = typer.Option("64", "--slide-patches", help="Patches per pseudo-slide, N or LOW-HIGH (drawn per slide); at most half of a split's normal patches."),
    tumour_share: str = typer.Option("0.02-0.10", "--tumour-share", help="Share of tumour patches in a tumour pseudo-slide, LOW-HIGH (normal slides: none)."),
    slides_source_train: int = typer.Option(20, "--slides-source-train", help="Pseudo-slides per class drawn from each hospital's source train split."),
    slides_target_train: int = typer.Option(10, "--slides-target-train", help="Pseudo-slides per class drawn from each hospital's target train split."),
    slides_test: int = typer.Option(20, "--slides-test", help="Pseudo-slides per class drawn from each hospital's target test split."),
) -> None:
    """Real-tissue benchmark centres: one per Camelyon17 hospital (--hospitals), or C1 = PCam train as is and
    C2 = PCam valid re-stained to one hospital (--target-domain)."""
    from histodd_fed.datasets.pcam_c17 import make_pcam_centres as build

    if hospitals is not None:
        if target_domain is not None:
            raise ConfigError("--target-domain builds the two-centre layout (C1 + C2); with --hospitals every "
                              "hospital is both a source and a target: give one of the two "
                              "(then coordinator transfer --sources 0 --target 2)")
        from histodd_fed.datasets.pseudo_slides import SlideSpec, parse_range

        spec = SlideSpec(patches=parse_range(slide_patches, what="--slide-patches", as_int=True),
                         tumour_share=parse_range(tumour_share, what="--tumour-share", as_int=False),
                         source_train=slides_source_train, target_train=slides_target_train,
                         test=slides_test) if slides else None
        _hospitals(pcam, stains, out, hospitals, target_train_per_class, seed, limit, jitter, spec)
        return
    target_domain = 2 if target_domain is None else target_domain
    m = build(pcam, stains, out, target_domain=target_domain, target_train_per_class=target_train_per_class,
              seed=seed, limit_per_class=limit, jitter=jitter)
    c2 = m["centres"]["C2"]
    a = m["stain_angle_deg"]
    typer.echo(f"C1: {m['centres']['C1']['patches']} patches {m['centres']['C1']['class_counts']} -> {out / 'C1'}")
    typer.echo(f"C2: train {c2['train_class_counts']}, test {c2['test_class_counts']} "
               f"(Camelyon17 domain {target_domain} stains) -> {out / 'C2'}")
    typer.echo(f"stain angle (deg): C2-target {a['C2_to_target']:.1f}, C2-C1 {a['C2_to_C1']:.1f}, "
               f"C1-target {a['C1_to_target']:.1f}; {out / 'centres.png'} ({m['seconds']:.0f}s)")


def _hospitals(pcam: Path, stains: Path, out: Path, hospitals: str, per_class: int, seed: int,
               limit: Optional[int], jitter: bool, slides: "SlideSpec | None") -> None:
    from histodd_fed.datasets.pcam_c17 import make_hospital_centres, parse_hospitals

    m = make_hospital_centres(pcam, stains, out, hospitals=parse_hospitals(hospitals),
                              target_train_per_class=per_class, seed=seed, limit_per_class=limit, jitter=jitter,
                              slides=slides)
    for cid, c in m["centres"].items():
        typer.echo(f"{cid} (Camelyon17 domain {c['domain']}): source {c['source_class_counts']} -> "
                   f"{out / c['source']}; target train {c['target_train_class_counts']}, test "
                   f"{c['target_test_class_counts']} -> {out / c['target']} (stain angle to its tiles "
                   f"{c['stain_angle_deg_to_tiles']:.1f} deg)")
        for folder, rec in (c.get("pseudo_slides") or {}).items():
            typer.echo(f"  {cid}/{folder}: " + (f"{rec['slides']} pseudo-slides of {rec['bag_sizes'][0]}-"
                                                f"{rec['bag_sizes'][1]} patches, tumour share "
                                                f"{rec['tumour_share'][0]:.1%}-{rec['tumour_share'][1]:.1%}, "
                                                f"{rec['bytes'] / 1e6:.1f} MB" if rec["slides"] else
                                                f"none ({rec['why_none']})"))
    typer.echo(f"{len(m['centres'])} hospitals, patch-disjoint; {out / 'manifest.json'}, {out / 'centres.png'} "
               f"({m['seconds']:.0f}s)")
