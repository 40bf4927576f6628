"""`centre-node audit`: privacy audit of a synthetic (or coreset) patch set (threshold attacks and/or LiRA)."""

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
    attack: str = typer.Option("threshold", "--attack", help="threshold: the audit (memorisation + loss / confidence "
                               "threshold attacks); lira: only LiRA, shadow re-runs of the set's recorded recipe on "
                               "halves of a member / non-member pool (needs --holdout); all: both."),
    shadows: int = typer.Option(16, "--shadows", help="LiRA: shadow runs of the recipe (each patch IN for half)."),
    pool: int = typer.Option(2000, "--pool", help="LiRA: pool size, half members drawn from --patches, half "
                             "non-members from --holdout (seeded)."),
    shadow_candidates: Optional[int] = typer.Option(None, "--shadow-candidates", help="LiRA, distilled sets: "
                                                    "best-of-K candidates per shadow run instead of the recorded "
                                                    "number (cheaper, not the exact recipe; recorded in audit.json)."),
    lira_epochs: Optional[int] = typer.Option(None, "--lira-epochs", help="LiRA: epochs of the evaluation "
                                              "classifier trained on each shadow set and on the set (default 200)."),
    workers: int = typer.Option(1, "--workers", help="LiRA: make this many shadows at once, each in its own "
                                "process with one torch thread (a machine with N free cores: N); the numbers equal "
                                "a one-process run's with --threads 1."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="LiRA: keep every finished shadow in "
                                "OUT/lira-shadows/ and, on a re-run of the same audit (same set, pool, seed, "
                                "recipe, classifier), skip the shadows already there; --no-resume re-runs them all."),
) -> None:
    """Audit a synthetic set for memorisation and membership leakage; write a Markdown + JSON + PNG report.

    Real and held-out patches are read as they sit on disk and put in the set's recorded view
    (meta "view": the crop / resize it was made from) and in the other plausible view of its size;
    the worst view decides (per-view rows in audit.md / audit.json). Patches that cannot be put in
    that view are refused with one line.

    --attack lira runs LiRA instead (docs/privacy.md, "LiRA (attack-based audit)"): the set's
    recorded recipe (distill config or coreset method) is re-run --shadows times on random halves of
    a pool of --pool patches (half members from --patches, half non-members from --holdout); writes
    audit.json ("lira": AUC, TPR at 1% / 0.1% FPR, ...), audit.md and lira_roc.png. --attack all:
    the audit above plus LiRA. Shadows are the long part (each one is a whole distillation); every
    finished one is kept in OUT/lira-shadows/, so an interrupted audit run again with the same
    arguments resumes where it stopped and gives the numbers an uninterrupted run gives.
    """
    from histodd_fed.errors import InputError
    from histodd_fed.patchset import PatchSet

    if attack not in ATTACKS:
        raise InputError(f"audit: --attack must be one of {', '.join(ATTACKS)}, got {attack!r}")
    if attack != "threshold":   # every LiRA input checked before anything is read or written
        if holdout is None:
            raise InputError(f"audit --attack {attack}: give --holdout HELD_OUT_DIR (the pool's non-members)")
        if shadows < 2 or pool < 4:
            raise InputError(f"audit --attack {attack}: need --shadows >= 2 and --pool >= 4 (got {shadows}, {pool})")
        if lira_epochs is not None and lira_epochs < 1:
            raise InputError(f"audit --attack {attack}: --lira-epochs must be >= 1")
        if workers < 1:
            raise InputError(f"audit --attack {attack}: --workers must be >= 1, got {workers}")
    syn = PatchSet.load(synthetic)  # bad input fails here, before torch is imported
    recipe = None
    if attack != "threshold":
        recipe = _recipe(syn, synthetic, shadow_candidates)
    if attack == "lira":
        _lira_only(syn, recipe, synthetic, patches, holdout, out, seed=seed, shadows=shadows, pool=pool,
                   limit_per_class=limit_per_class, holdout_limit_per_class=holdout_limit_per_class,
                   threads=threads, epochs=lira_epochs, resume=resume, workers=workers)
        return
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
    if attack == "all":
        res, d = _run_lira(syn, recipe, real, hold, patches, holdout, seed=seed, shadows=shadows, pool=pool,
                           threads=threads, epochs=lira_epochs, checkpoint=out / SHADOW_DIR if resume else None,
                           workers=workers)
        _write_lira(out, res, d, merge=True)
        _echo_lira(d, recipe)
    typer.echo(f"report: {out / 'audit.md'}")
    if fail_on_risk and report.flagged:
        raise typer.Exit(3)

# ---------------------------------------------------------------------------- LiRA
ATTACKS = ("threshold", "lira", "all")
#: where LiRA keeps its finished shadows, inside the audit's --out
SHADOW_DIR = "lira-shadows"


def _recipe(syn, path: Path, shadow_candidates: Optional[int]):
    """The set's recorded recipe (one-line error when it records none), with --shadow-candidates."""
    from histodd_fed.errors import InputError
    from histodd_fed.release.recipes import recipe_from_set

    recipe = recipe_from_set(syn, where=str(path))
    if shadow_candidates is not None:
        if recipe.kind != "distill" or shadow_candidates < 1:
            raise InputError(f"audit: --shadow-candidates N (N >= 1) applies to distilled sets; {path} is a "
                             f"{recipe.kind} ({recipe.method})")
        recipe = recipe_from_set(syn, overrides={"candidates": shadow_candidates}, where=str(path))
    return recipe


def _sample(ps, n: int, seed: int, salt: int):
    import numpy as np

    rng = np.random.default_rng([int(seed), salt])
    return ps.subset(np.sort(rng.choice(len(ps), n, replace=False)))


def _made_from(meta: dict) -> Optional[int]:
    """How many real patches the set was made from, as its meta records it (None: not recorded)."""
    sel = meta.get("selection") or {}
    for v in (sel.get("distilled_from_images"), meta.get("source_num_images"), meta.get("source_size")):
        if v is not None:
            return int(v)
    return None


def _run_lira(syn, recipe, real, hold, patches: Path, holdout: Path, *, seed: int, shadows: int, pool: int,
              threads: Optional[int], epochs: Optional[int], checkpoint: Optional[Path] = None, workers: int = 1):
    """LiRA on ``syn``: (LiraResult, the ``lira`` JSON with the pool, recipe and design recorded)."""
    import dataclasses

    import torch

    from histodd_fed.errors import InputError
    from histodd_fed.privacy.lira import DEFAULT_TRAIN_SPEC, run_lira
    from histodd_fed.release.recipes import in_set_view

    n_side = min(pool // 2, len(real), len(hold))
    if n_side < 2:
        raise InputError(f"audit --attack lira: need at least 2 members and 2 non-members (got {len(real)}, {len(hold)})")
    members = in_set_view(syn, _sample(real, n_side, seed, 1), where=str(patches))
    non_members = in_set_view(syn, _sample(hold, n_side, seed, 2), where=str(holdout))
    spec = DEFAULT_TRAIN_SPEC if epochs is None else dataclasses.replace(DEFAULT_TRAIN_SPEC, epochs=int(epochs))
    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        res = run_lira(syn, members, non_members, recipe, shadows=shadows, train_spec=spec, seed=seed, progress=True,
                       checkpoint_dir=checkpoint, recipe_id=recipe.to_dict(), workers=workers)
    finally:
        torch.set_num_threads(prev)
    if res.resumed_shadows:
        typer.echo(f"LiRA: {res.resumed_shadows} of {shadows} shadows resumed from {checkpoint}")
    made_from = _made_from(syn.meta)
    d = res.to_dict()
    d["recipe"] = recipe.to_dict()
    d["pool"] = {"size": 2 * n_side, "members": n_side, "non_members": n_side, "members_from": str(patches),
                 "non_members_from": str(holdout), "requested": pool, "view": members.meta.get("view")}
    d["design"] = {
        "target": (f"the set as released: made from all of --patches ({made_from} patches, as its meta records)"
                   if made_from is not None else "the set as released: made from all of --patches (count not recorded)"),
        "shadows": f"{shadows} re-runs of its recipe, each on a random half of the pool (~{n_side} patches); every "
                   f"pool patch is IN for {shadows // 2} of them",
        "what_it_means": "The IN / OUT Gaussians describe membership in a recipe run on ~half the pool, not in the "
                         "run that made the released set. When the set was made from more patches than that, a member "
                         "weighs less in it than an IN patch does in a shadow (a random coreset, for one, picks a "
                         "given patch with probability ipc / class size), so the test is mis-specified: the numbers "
                         "say how well this calibrated attack tells these members from these non-members, not the "
                         "leakage of an idealised experiment, and an AUC near 0.5 means 'not detected by this "
                         "attack', not a bound. benchmarks/bench_lira_pcam.py runs the textbook design (the target "
                         "made from exactly the members half of the pool).",
        "target_made_from": made_from}
    return res, d


def _lira_markdown(d: dict) -> str:
    rows = [("LiRA online", d["auc"], d["tpr_at_fpr"]), ("LiRA offline", d["offline"]["auc"], d["offline"]["tpr_at_fpr"]),
            ("global threshold (no shadows)", d["baseline_global_threshold"]["auc"],
             d["baseline_global_threshold"]["tpr_at_fpr"])]
    if "released_set" in d:
        rs = d["released_set"]
        rows += [("LiRA on the set's images, online", rs["auc"], rs["tpr_at_fpr"]),
                 ("LiRA on the set's images, offline", rs["offline"]["auc"], rs["offline"]["tpr_at_fpr"])]
    lines = ["## LiRA (shadow re-runs of the set's recipe)", "",
             f"Recipe: {d['recipe']['description']}. {d['shadows']} shadows, {d['members']} members vs "
             f"{d['non_members']} non-members (FPR resolution {d['fpr_resolution']:.4f}); variance: {d['variance']}; "
             f"queries: {', '.join(d['augmentations'])}.", "",
             "| attack | ROC AUC | TPR @ 1% FPR | TPR @ 0.1% FPR |", "|---|---|---|---|"]
    lines += [f"| {n} | {a:.4f} | {t['0.01']:.4f} | {t['0.001']:.4f} |" for n, a, t in rows]
    lines += ["", f"Target: {d['design']['target']}; shadows: {d['design']['shadows']}.", "",
              d["design"]["what_it_means"], "", "![LiRA ROC](lira_roc.png)", "",
              "An empirical attack, not a privacy guarantee; see docs/privacy.md, \"LiRA (attack-based audit)\".", ""]
    return "\n".join(lines)


def _write_lira(out: Path, res, d: dict, *, merge: bool, header: Optional[dict] = None) -> None:
    """Write ``lira_roc.png`` and the ``lira`` entry of ``audit.json`` (merged into an existing audit, or a
    LiRA-only ``audit.json`` / ``audit.md``), each file atomically."""
    import json

    from histodd_fed.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
    from histodd_fed.privacy.audit import AUDIT_FORMAT, AUDIT_VERSION
    from histodd_fed.privacy.lira import lira_roc_png

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "lira_roc.png", lira_roc_png(res))
    if merge:
        doc = json.loads((out / "audit.json").read_text())
        doc["lira"] = d
        doc.setdefault("files", {})["lira_roc"] = "lira_roc.png"
        atomic_write_json(out / "audit.json", doc)
        atomic_write_text(out / "audit.md", (out / "audit.md").read_text() + "\n" + _lira_markdown(d))
        return
    doc = {"format": AUDIT_FORMAT, "version": AUDIT_VERSION, "attack": "lira", **(header or {}), "lira": d,
           "files": {"json": "audit.json", "markdown": "audit.md", "lira_roc": "lira_roc.png"}}
    atomic_write_json(out / "audit.json", doc)
    h = header or {}
    atomic_write_text(out / "audit.md", "\n".join(["# Privacy audit: LiRA", "",
                                                   f"- synthetic set: {h.get('synthetic', {}).get('path')}",
                                                   f"- members from: {d['pool']['members_from']}",
                                                   f"- non-members from: {d['pool']['non_members_from']}",
                                                   f"- seed {h.get('seed')}", ""]) + "\n" + _lira_markdown(d))


def _lira_only(syn, recipe, synthetic: Path, patches: Path, holdout: Path, out: Path, *, seed: int, shadows: int,
               pool: int, limit_per_class: Optional[int], holdout_limit_per_class: Optional[int],
               threads: Optional[int], epochs: Optional[int], resume: bool = True, workers: int = 1) -> None:
    """``audit --attack lira``: LiRA only; image folders are read only as far as the pool needs."""
    from histodd_fed.runconfig import write_run_config

    per_class = -(-(pool // 2) // max(1, syn.num_classes))
    real = _load(patches, limit_per_class or per_class, seed)
    hold = _load(holdout, holdout_limit_per_class or per_class, seed + 1)
    res, d = _run_lira(syn, recipe, real, hold, patches, holdout, seed=seed, shadows=shadows, pool=pool,
                       threads=threads, epochs=epochs, checkpoint=out / SHADOW_DIR if resume else None,
                       workers=workers)
    header = {"seed": seed, "synthetic": {"path": str(synthetic), "kind": syn.kind, "n": len(syn),
                                          "method": syn.meta.get("method"), "image_size": syn.image_size,
                                          "view": syn.meta.get("view")},
              "real": {"path": str(patches)}, "holdout": {"path": str(holdout)}}
    _write_lira(out, res, d, merge=False, header=header)
    write_run_config(out, "centre-node audit --attack lira", {"synthetic": str(synthetic), "patches": str(patches),
                                                              "holdout": str(holdout), "seed": seed, "shadows": shadows,
                                                              "pool": pool, "recipe": recipe.to_dict(),
                                                              "train_spec": d["train_spec"]})
    _echo_lira(d, recipe)
    typer.echo(f"report: {out / 'audit.json'}, {out / 'lira_roc.png'}")


def _echo_lira(d: dict, recipe) -> None:
    t = d["tpr_at_fpr"]
    typer.echo(f"LiRA ({d['shadows']} shadows, {d['members']} members vs {d['non_members']} non-members, recipe: "
               f"{recipe.describe()}): AUC {d['auc']:.3f}, TPR {t['0.01']:.3f} at 1% FPR, {t['0.001']:.3f} at 0.1% "
               f"(global threshold AUC {d['baseline_global_threshold']['auc']:.3f})")
    if "released_set" in d:
        rs = d["released_set"]
        typer.echo(f"LiRA on the set's own images: AUC {rs['auc']:.3f}, TPR {rs['tpr_at_fpr']['0.01']:.3f} at 1% FPR, "
                   f"{rs['tpr_at_fpr']['0.001']:.3f} at 0.1% (offline AUC {rs['offline']['auc']:.3f})")


def register(app: typer.Typer) -> None:
    """Add ``audit`` to ``app``."""
    app.command("audit")(audit)
