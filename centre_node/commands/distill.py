"""`centre-node distill`: Histo-DD distillation of a real patch store (or of slides, tiled first)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from histodd_fed.terminal import escape

log = logging.getLogger(__name__)
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESET_HELP = ("Named preset (configs/preset-NAME.yaml, or a YAML path): fixes the preprocessing and the "
               "distillation recipe. pcam: 96-px PCam-style patches, the central 32 px kept (PCam's label "
               "region), ConvNet-3 w32 matching; the set records that view so export / audit / evaluate "
               "apply it. Explicit flags (--ipc, --init, --lr-img, --outer-steps, ...) override the preset.")


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("distill")(distill_command)


def distill_command(
    out: Path = typer.Option(..., "--out", help="Output directory for the synthetic patch set."),
    patches: Optional[Path] = typer.Option(None, "--patches", help="Real patch store (PatchSet dir or CLASS/*.jpg folder)."),
    slides: Optional[Path] = typer.Option(None, "--slides", help="Folder of slides (or one slide) to tile first."),
    labels_csv: Optional[Path] = typer.Option(None, "--labels-csv", help="Tiling: slide labels CSV."),
    annotations_dir: Optional[Path] = typer.Option(None, "--annotations-dir", help="Tiling: annotation folder."),
    patch_size: int = typer.Option(256, "--patch-size", help="Tiling: patch size in pixels."),
    mpp: float = typer.Option(2.0, "--mpp", help="Tiling: target microns per pixel."),
    magnification: Optional[float] = typer.Option(None, "--magnification", help="Tiling: target magnification (overrides --mpp)."),
    tissue_threshold: float = typer.Option(0.5, "--tissue-threshold", help="Tiling: minimum tissue fraction."),
    slide_mpp: Optional[float] = typer.Option(None, "--slide-mpp", help="Tiling: MPP of slides that record none."),
    workers: int = typer.Option(1, "--workers", help="Worker processes: tiling, and best-of-K candidates distilled at "
                                "once (each one torch thread; same set as one process with one thread). Up to the "
                                "number of CPU cores."),
    preset: Optional[str] = typer.Option(None, "--preset", help=PRESET_HELP),
    config: Optional[Path] = typer.Option(None, "--config", help="Distill YAML (default: configs/distill-cpu.yaml; "
                                          "not with --preset)."),
    ipc: Optional[int] = typer.Option(None, "--ipc", help="Synthetic images per class (per slide with --per-slide)."),
    outer_steps: Optional[int] = typer.Option(None, "--outer-steps", help="K: outer steps."),
    inner_steps: Optional[int] = typer.Option(None, "--inner-steps", help="U: inner steps."),
    lr_img: Optional[float] = typer.Option(None, "--lr-img", help="Synthetic image learning rate."),
    model: Optional[str] = typer.Option(None, "--model", help="convnet | resnetap10."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Resize patches to this size."),
    per_slide: Optional[bool] = typer.Option(None, "--per-slide/--per-class", help="Slide-level mode (for MIL)."),
    init: Optional[str] = typer.Option(None, "--init", help="real (paper) | noise | herding (start from the herding coreset) | "
                                       "public (with --epsilon: PUBLIC images from --public-dir)."),
    epsilon: Optional[float] = typer.Option(None, "--epsilon",
                                            help="Differential privacy: distil with the preset's DP recipe (distill_dp: "
                                                 "one-shot DP mean embeddings, dm-dp) at this epsilon (> 0)."),
    delta: Optional[float] = typer.Option(None, "--delta", help="DP delta, in (0, 1) (default 1e-5; with --epsilon)."),
    public_dir: Optional[Path] = typer.Option(None, "--public-dir",
                                              help="With --epsilon: folder of PUBLIC images (never the centre's patches) "
                                                   "to start from and centre the embeddings on."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),
    candidates: Optional[int] = typer.Option(None, "--candidates",
                                             help="Best of K: distil K candidate sets from all but a held-out part of "
                                                  "the patches and keep the one that trains best on it (1: off)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda."),
    split: str = typer.Option("train", "--split", help="Slide split to distil when the store has one."),
    limit_per_class: Optional[int] = typer.Option(None, "--limit-per-class",
                                                  help="Distil from at most N patches per class (a random subset, "
                                                       "seeded by --seed; the export gate still audits against the "
                                                       "whole store)."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Pool cache + checkpoints (default: OUT.work)."),
    gate: bool = typer.Option(True, "--gate/--no-gate",
                              help="After distilling, run the export gate on the set against the raw --patches (the "
                                   "same call `export --patches` makes) and print its verdict to OUT/gate.json."),
    resume: bool = typer.Option(True, "--resume/--no-resume",
                                help="Continue from the checkpoint of the same data + config in the work dir "
                                     "(after a kill, no work lost); --no-resume starts from step 0."),
) -> None:
    """Distil real patches into a few synthetic patches per class (Histo-DD).

    With --preset (e.g. pcam) the patches are put in the preset's view (pcam: centre 32 px of each
    96-px patch) and distilled with its recipe; the synthetic set records the view in its meta.
    """
    import math

    from histodd_fed.errors import InputError

    if epsilon is not None and not (math.isfinite(epsilon) and epsilon > 0):
        raise InputError(f"distill: --epsilon must be a finite number > 0, got {epsilon}")
    if delta is not None and epsilon is None:
        raise InputError("distill: --delta needs --epsilon")
    if delta is not None and not 0 < delta < 1:
        raise InputError(f"distill: --delta must be in (0, 1), got {delta}")
    if public_dir is not None and epsilon is None:
        raise InputError("distill: --public-dir is for DP runs (--epsilon)")
    if workers < 1:
        raise InputError(f"distill: --workers must be >= 1, got {workers}")
    if limit_per_class is not None and limit_per_class < 1:
        raise InputError(f"distill: --limit-per-class must be >= 1, got {limit_per_class}")
    if (patches is None) == (slides is None):
        raise InputError("distill: give exactly one of --patches STORE or --slides DIR")
    if preset is not None and config is not None:
        raise InputError("distill: give --preset or --config, not both (flags override either)")
    from histodd_fed.distill import DistillConfig, run_distillation
    from histodd_fed.patchset import PatchSet
    from histodd_fed.runconfig import write_run_config

    cfg_path = config if config is not None else REPO_CONFIGS / "distill-cpu.yaml"
    overrides = dict(ipc=ipc, outer_steps=outer_steps, inner_steps=inner_steps, lr_img=lr_img, model=model,
                     image_size=image_size, per_slide=per_slide, init=init, seed=seed, device=device,
                     candidates=candidates)
    dp = epsilon is not None
    if dp:
        overrides.update(dp_epsilon=epsilon, dp_delta=delta, public_dir=None if public_dir is None else str(public_dir))
    pre = None
    if preset is not None:
        from histodd_fed.preset import load_preset

        pre = load_preset(preset)
        cfg_path = pre.path
        cfg = pre.distill_config(dp=dp, **overrides)
    elif cfg_path.exists() or config is not None:
        cfg = DistillConfig.from_yaml(cfg_path, **overrides)
    else:
        cfg = DistillConfig.from_dict({}, **overrides)
    _refuse_unused(cfg, {"--inner-steps": inner_steps})
    work = work_dir if work_dir is not None else out.parent / f"{out.name}.work"

    if slides is not None:
        from histodd_fed.slides.tiling import tile_slides

        store = work / "tiles"
        log.info("tiling %s into %s", slides, store)
        from histodd_fed.slides.store_checks import check_distillable, tiling_warnings

        tiled = tile_slides(slides, store, labels_csv=labels_csv, annotations_dir=annotations_dir,
                            patch_size=patch_size, mpp=mpp, magnification=magnification,
                            tissue_threshold=tissue_threshold, workers=workers, slide_mpp=slide_mpp, seed=cfg.seed)
        # say what tiling did, and refuse a store that cannot give ipc images per class with its real cause
        for line in tiling_warnings(tiled):
            typer.echo(f"warning: {escape(line)}", err=True)
        check_distillable(tiled, ipc=1 if cfg.per_slide else cfg.ipc, mpp=mpp, patch_size=patch_size,
                          magnification=magnification)
        patches = store
    real = PatchSet.load(patches)
    reference = real          # the export gate's reference: every raw patch of the store, as `export --patches` loads it
    if real.meta.get("slide_splits"):     # a tiled slide store; an imported patch folder has none ({})
        from histodd_fed.slides.manifest import select_split

        real = select_split(real, split)
        log.info("using the %s split: %d patches", split, len(real))
    if len(real) == 0:
        raise InputError(f"{patches}: no patches to distil (split {split!r})")
    if limit_per_class is not None:
        from histodd_fed.training.data import limit_per_class as cap

        real = cap(real, limit_per_class, seed=cfg.seed)
        log.info("--limit-per-class %d: distilling from %d patches %s", limit_per_class, len(real), real.class_counts())
    from histodd_fed.preprocess import current_view, to_view

    if pre is not None and pre.view is not None:
        real = to_view(real, pre.view, where=str(patches))
        log.info("preset %s: patches in view %s", pre.name, pre.view.describe())
    log.info("distilling %d patches %s with %s ipc=%d K=%d U=%d", len(real), real.class_counts(), cfg.model,
             cfg.ipc, cfg.outer_steps, cfg.inner_steps)
    from histodd_fed.release.choose import candidate_check, release_verdict

    res = run_distillation(real, cfg, work_dir=work, resume=resume, workers=workers,
                           candidate_check=candidate_check(reference) if cfg.candidate_gate else None)
    syn = res.patchset
    if not dp:    # a DP set's meta holds nothing the accounting does not cover (the path is in run_config.json)
        syn.meta["source"] = str(patches)
    syn.meta["split"] = split
    syn.meta.setdefault("view", current_view(real).with_size(cfg.image_size).to_dict())
    if pre is not None:
        syn.meta["preset"] = pre.name
    syn.save(out)
    write_run_config(out, "centre-node distill", {"distill": cfg.to_dict(), "patches": str(patches),
                                                  "slides": None if slides is None else str(slides), "split": split,
                                                  "work_dir": str(work), "config_file": str(cfg_path),
                                                  "limit_per_class": limit_per_class,
                                                  "preset": None if pre is None else pre.to_dict(),
                                                  "view": syn.meta["view"]})
    verdict = None
    if gate:
        from histodd_fed.atomic import atomic_write_json

        log.info("export gate on the written set (the same check `export --patches %s` makes)", patches)
        verdict = release_verdict(syn, reference)
        atomic_write_json(out / "gate.json", {**verdict, "reference": str(patches)})
    from histodd_fed.distill.plots import save_drift, save_grid, save_loss_curve

    save_loss_curve(syn.meta["loss_curve"], out / "loss_curve.png")
    save_grid(res.initial_images, syn.images, syn.labels, syn.class_names, out / "synthetic_grid.png")
    if syn.meta.get("drift"):
        from histodd_fed.atomic import atomic_write_json

        if res.drift_local is not None:   # per image, and to the real source patches: this disk only, never meta
            atomic_write_json(out / "drift.json", res.drift_local)
        save_drift(syn.meta["drift"], out / "drift.png", (res.drift_local or {}).get("to_real_summary"))
        typer.echo(f"method {syn.meta.get('method')}: {drift_line(syn.meta['drift'])}")
    t = syn.meta["timings"]
    if dp:
        d = syn.meta["dp"]
        _echo_verdict(verdict)
        typer.echo(f"wrote {len(syn)} synthetic patches to {out}: dm-dp, ({d['epsilon']:.3f}, {d['delta']:g})-DP "
                   f"per patch (noise multiplier {d['noise_multiplier']:.3f}, clip {d['clip']:g}, {d['accountant']}); "
                   f"matching {t['matching_s']:.1f}s")
        return
    typer.echo(f"wrote {len(syn)} synthetic patches {syn.class_counts()} to {out} "
               f"(pool {t['pool_s']:.1f}s{' cached' if syn.meta['pool']['reused'] else ''}, "
               f"matching {t['matching_s']:.1f}s, total {t['total_s']:.1f}s)")
    sel = syn.meta.get("selection")
    if sel:
        accs = ", ".join(f"{c['heldout_accuracy']:.3f}" for c in sel["candidates"])
        typer.echo(f"best of {len(sel['candidates'])}: kept candidate {sel['chosen']} (held-out accuracy {accs} on "
                   f"{sel['heldout_images']} of the centre's own patches, {sel['seconds']:.0f}s in all)")
        g = sel.get("gate")
        if g:
            typer.echo(f"candidate choice (the gate's calibrated rules): checked candidate(s) "
                       f"{', '.join(map(str, g['audited']))}; " + ("the kept one passes them" if g["passed"] else
                                                                   "none passes them"))
    _echo_verdict(verdict)
    if not syn.meta["complete"]:
        typer.echo("warning: distillation incomplete", err=True)


def _refuse_unused(cfg, given: dict) -> None:
    """One line for a flag the recipe does not use (e.g. --inner-steps with distribution matching)."""
    from histodd_fed.errors import InputError

    if given.get("--inner-steps") is not None and (cfg.objective != "gradient" or cfg.dp_epsilon):
        raise InputError(f"distill: --inner-steps is not used by this recipe (objective {cfg.objective!r}"
                         f"{', dm-dp' if cfg.dp_epsilon else ''}: one image step per outer step, no network "
                         "steps between them); set --outer-steps")


def drift_line(d: dict) -> str:
    """``meta["drift"]`` in one line: the last record's mean drift from the starting images."""
    if not d or not d.get("steps"):
        return "no drift record"
    return (f"drift from the start after {d['steps'][-1]} outer steps (mean over {d.get('n_images')} images): "
            f"RMS {d['rms_mean'][-1]:.4f}, SSIM {d['ssim_mean'][-1]:.3f}, structure {d['structure_mean'][-1]:.3f}")


def _echo_verdict(verdict: dict | None) -> None:
    """The export gate's verdict on the written set: what `export` with the same --patches will decide."""
    if verdict is None:
        return
    if verdict["passed"]:
        typer.echo("export gate (every rule, as `export` runs it): passes")
    else:
        typer.echo(f"export gate (every rule, as `export` runs it): BLOCKED - {verdict['reasons'][0]}"
                   + (f" (+{len(verdict['reasons']) - 1} more)" if len(verdict["reasons"]) > 1 else "")
                   + "; `export` will refuse this set (details: gate.json)", err=True)
