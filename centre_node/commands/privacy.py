"""`centre-node audit`: privacy audit of a synthetic (or coreset) patch set."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _load(path: Path, limit_per_class: Optional[int], seed: int):
    """A patch-set directory, or an image folder (``CLASS/*.jpg``, e.g. PCam) as it sits on disk,
    subsampled (the audit applies the set's view)."""
    from histodd_fed.patchset import PatchSet, load_image_folder

    if (path / "patchset.json").exists() or not path.is_dir():
        return PatchSet.load(path)
    return load_image_folder(path, limit_per_class=limit_per_class, seed=seed)


def audit(
    synthetic: Path = typer.Option(..., "--synthetic", help="Synthetic (or coreset) patch-set directory to audit."),
    patches: Path = typer.Option(..., "--patches", help="The centre's real patches it was made from (members): "
                                 "patch-set dir or CLASS/*.jpg folder."),
    holdout: Optional[Path] = typer.Option(None, "--holdout", help="Held-out real patches (non-members); "
                                           "enables the membership-inference attack."),
    out: Path = typer.Option(Path("privacy-audit"), "--out", help="Report folder (audit.md, audit.json, PNGs)."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random choice and training run."),
    config: Optional[Path] = typer.Option(None, "--config", help="Privacy YAML (default: configs/privacy.yaml "
                                          "when present, else built-in defaults)."),
    encoder: Optional[Path] = typer.Option(None, "--encoder", help="The centre's patch classifier (saved model dir) "
                                           "whose features give the feature metric; default: train a ConvNet briefly."),
    limit_per_class: Optional[int] = typer.Option(None, "--limit-per-class", help="Seeded subset per class of "
                                                  "image-folder patches."),
    holdout_limit_per_class: Optional[int] = typer.Option(None, "--holdout-limit-per-class",
                                                          help="Seeded subset per class of an image-folder holdout."),
    no_membership: bool = typer.Option(False, "--no-membership", help="Skip the membership-inference attack."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch threads during the audit."),
    fail_on_risk: bool = typer.Option(False, "--fail-on-risk", help="Exit 3 when a gate rule fires."),
) -> None:
    """Audit a synthetic set for memorisation and membership leakage; write a Markdown + JSON + PNG report.

    Real and held-out patches are read as they sit on disk and put in the set's recorded view
    (meta "view": the crop / resize it was made from) and in the other plausible view of its size;
    the worst view decides (per-view rows in audit.md / audit.json). Patches that cannot be put in
    that view are refused with one line.
    """
    from histodd_fed.patchset import PatchSet

    syn = PatchSet.load(synthetic)  # bad input fails here, before torch is imported
    real = _load(patches, limit_per_class, seed)
    hold = None if holdout is None else _load(holdout, holdout_limit_per_class, seed)

    from histodd_fed.privacy.audit import AuditConfig, run_view_audits
    from histodd_fed.privacy.gate import DEFAULT_CONFIG

    if config is not None:
        cfg = AuditConfig.from_yaml(config, seed=seed)
    elif DEFAULT_CONFIG.exists():
        cfg = AuditConfig.from_yaml(DEFAULT_CONFIG, seed=seed)
    else:
        cfg = AuditConfig(seed=seed)
    if no_membership:
        cfg.membership.enabled = False
    if threads:
        cfg.num_threads = threads
    enc = None
    if encoder is not None:
        from histodd_fed.training import load_model

        enc = load_model(encoder)
    report = run_view_audits(syn, real, hold, cfg, out_dir=out, encoder=enc,
                       paths={"synthetic": str(synthetic), "real": str(patches),
                              "holdout": None if holdout is None else str(holdout)})
    s = report.summary()
    line = (f"audit of {s['n_synthetic']} patches vs {s['n_real']} real: max SSIM {s['ssim']['closest']:.3f}, "
            f"min L2 {s['l2']['closest']:.4f} (real-real p1 {s['l2']['real_real_p1']:.4f})")
    if s["membership"]:
        line += f", attack AUC {s['membership']['max_auc']:.3f}"
    typer.echo(line)
    for v in s.get("views") or []:
        typer.echo(f"  view {v['view_text']}: {'FLAGGED' if v['flagged'] else 'passes'} (max SSIM {v.get('ssim', float('nan')):.3f})")
    typer.echo(("FLAGGED: " + "; ".join(report.risks)) if report.flagged else "passes the gate rules")
    typer.echo(f"report: {out / 'audit.md'}")
    if fail_on_risk and report.flagged:
        raise typer.Exit(3)


def register(app: typer.Typer) -> None:
    """Add ``audit`` to ``app``."""
    app.command("audit")(audit)
