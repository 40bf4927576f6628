"""`centre-node` commands that build benchmark centres from the shared real data: make-pcam-centres."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("make-pcam-centres")(make_pcam_centres)


def make_pcam_centres(
    pcam: Path = typer.Option(..., "--pcam", help="PCam folder with train/ and valid/ (CLASS/*.jpg), e.g. ../shared/data/pcam-ai4all."),
    stains: Path = typer.Option(..., "--stains", help="Camelyon17 stain tiles domain_<centre>_<id>.png, e.g. ../shared/data/camelyon17-stain-tiles."),
    out: Path = typer.Option(..., "--out", help="Folder for C1/, C2/{train,test}/, manifest.json, centres.png."),
    target_domain: int = typer.Option(2, "--target-domain", help="Camelyon17 centre (0-4) whose stains C2 gets."),
    target_train_per_class: int = typer.Option(50, "--target-train-per-class", help="Labelled C2 train patches per class; the rest of C2 is its test set."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, the jitter and any --limit subset."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use at most this many PCam patches per class and split (tests, quick looks)."),
    jitter: bool = typer.Option(True, "--jitter/--no-jitter", help="Per-patch stain jitter from the spread across the centre's tiles."),
) -> None:
    """Two centres of real PCam tissue: C1 = PCam train as is; C2 = PCam valid re-stained to a Camelyon17 centre."""
    from histodd_fed.datasets.pcam_c17 import make_pcam_centres as build

    m = build(pcam, stains, out, target_domain=target_domain, target_train_per_class=target_train_per_class,
              seed=seed, limit_per_class=limit, jitter=jitter)
    c2 = m["centres"]["C2"]
    a = m["stain_angle_deg"]
    typer.echo(f"C1: {m['centres']['C1']['patches']} patches {m['centres']['C1']['class_counts']} -> {out / 'C1'}")
    typer.echo(f"C2: train {c2['train_class_counts']}, test {c2['test_class_counts']} "
               f"(Camelyon17 domain {target_domain} stains) -> {out / 'C2'}")
    typer.echo(f"stain angle (deg): C2-target {a['C2_to_target']:.1f}, C2-C1 {a['C2_to_C1']:.1f}, "
               f"C1-target {a['C1_to_target']:.1f}; {out / 'centres.png'} ({m['seconds']:.0f}s)")
