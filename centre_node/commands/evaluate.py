"""`centre-node` commands: coreset, evaluate, and the `study` group (the paper's patch studies).

Thin wrappers: parse options, call ``histodd_fed.coreset`` / ``histodd_fed.training`` /
``histodd_fed.studies``. torch is imported inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

study_app = typer.Typer(help="The paper's patch-level studies (Tables 1-3, Figure 1).", no_args_is_help=True)


def _ints(text: Optional[str]) -> Optional[list[int]]:
    if not text:
        return None
    from histodd_fed.errors import ConfigError

    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated integers, got {text!r}") from None


def _words(text: Optional[str]) -> Optional[list[str]]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _threads(n: Optional[int]) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


PRESET_HELP = ("Named preset (configs/preset-NAME.yaml, or a YAML path) fixing the preprocessing and the {what}. "
               "pcam: 96-px PCam-style patches, the central 32 px kept (PCam's label region); {detail} "
               "Explicit flags override the preset's values.")


def _load_preset(preset: Optional[str]):
    if preset is None:
        return None
    from histodd_fed.preset import load_preset

    return load_preset(preset)


def coreset(
    method: str = typer.Option(..., "--method", help="random | herding | forgetting"),
    ipc: int = typer.Option(..., "--ipc", help="Real patches kept per class."),
    patches: Path = typer.Option(..., "--patches", help="Patch store: a PatchSet directory or an image folder."),
    out: Path = typer.Option(..., "--out", help="Output PatchSet directory (kind coreset)."),
    preset: Optional[str] = typer.Option(None, "--preset", help=PRESET_HELP.format(
        what="coreset options", detail="herding / forgetting features from a ConvNet-3 w32 (the evaluation net).")),
    seed: int = typer.Option(0, "--seed"),
    arch: Optional[str] = typer.Option(None, "--arch", help="Network trained for herding features / forgetting "
                                       "counts (default: the preset's, else resnet18)."),
    feature_epochs: Optional[int] = typer.Option(None, "--feature-epochs", help="Herding: epochs of the feature "
                                                 "network (default: the preset's, else 5)."),
    forgetting_epochs: Optional[int] = typer.Option(None, "--forgetting-epochs", help="Forgetting: epochs over "
                                                    "which events count (default: the preset's, else 10)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Resize patches to this size (after the "
                                             "preset's view)."),
    device: str = typer.Option("auto", "--device"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads."),
) -> None:
    """Select a coreset of IPC real patches per class (Random, Herding or Forgetting).

    The coreset records the view its patches are in (meta "view"; with --preset pcam the centre
    32 px of 96-px patches), so export / audit / evaluate apply the same view to real and test patches.
    """
    from histodd_fed.coreset import CoresetConfig, build_coreset
    from histodd_fed.logging_setup import progress_enabled
    from histodd_fed.runconfig import write_run_config
    from histodd_fed.training.data import load_patches

    _threads(threads)
    pre = _load_preset(preset)
    opts = dict(method=method, ipc=ipc, seed=seed, arch=arch, feature_epochs=feature_epochs,
                forgetting_epochs=forgetting_epochs, device=device)
    if pre is not None:
        if arch is not None and arch != pre.coreset.get("arch"):
            opts["arch_kwargs"] = {}   # the preset's network options belong to its network
        cfg = pre.coreset_config(**opts)
    else:
        cfg = CoresetConfig(**{k: v for k, v in opts.items() if v is not None})
    cfg.validate()
    real = load_patches(patches, image_size=image_size, view=None if pre is None else pre.view)
    cs = build_coreset(real, cfg, progress=progress_enabled())
    cs.meta["source"] = str(patches)
    if pre is not None:
        cs.meta["preset"] = pre.name
    cs.save(out)
    write_run_config(out, "centre-node coreset", {"patches": str(patches), "image_size": image_size,
                                                  "preset": None if pre is None else pre.to_dict(),
                                                  "view": cs.meta.get("view"), **cfg.__dict__})
    typer.echo(f"{out}: {len(cs)} patches ({cs.class_counts()}), method {method}, ipc {ipc}, seed {seed}")


def _eval_data(train: Path, test: Path, pre, image_size: Optional[int], test_limit: Optional[int]):
    """(train, test) in one view: the training set's recorded view (a synthetic set / coreset), else the
    preset's, applied to the test patches (raw patches are transformed, others refused)."""
    import logging

    from histodd_fed.preprocess import recorded_view, resize_to, to_view
    from histodd_fed.training.data import load_patches

    log = logging.getLogger(__name__)
    tr = load_patches(train)
    view = recorded_view(tr)
    if view is not None and not view.is_identity:
        if pre is not None and pre.view is not None and view != pre.view:
            log.warning("%s records view %s; the preset's view %s is not used", train, view.describe(),
                        pre.view.describe())
    elif pre is not None and pre.view is not None:
        tr = to_view(tr, pre.view, where=str(train))
        view = pre.view
    else:
        view = None
    if image_size:
        tr = resize_to(tr, image_size)
    if view is not None and not view.is_identity:
        te = load_patches(test, view=view, limit=test_limit, seed=1, where=str(test))
    else:
        te = load_patches(test, limit=test_limit, seed=1)
        if te.image_size != tr.image_size:
            log.warning("%s records no view; resizing the test patches %d -> %d px", train, te.image_size,
                        tr.image_size)
    return tr, resize_to(te, tr.image_size)


def evaluate(
    train: Path = typer.Option(..., "--train", help="Training set: PatchSet directory or image folder."),
    test: Path = typer.Option(..., "--test", help="Test set: PatchSet directory or image folder (raw patches: the "
                              "training set's recorded view, else the preset's, is applied)."),
    preset: Optional[str] = typer.Option(None, "--preset", help=PRESET_HELP.format(
        what="evaluation recipe", detail="a fresh ConvNet-3 w32 per seed, flip_rotate augmentation, 200 epochs on "
        "synthetic sets / coresets and 30 on real sets, lr 0.01, batch 128, 3 seeds.")),
    arch: Optional[str] = typer.Option(None, "--arch", help="Evaluation network (resnet18 | densenet121 | vit | "
                                       "convnet ...; default: the preset's, else resnet18)."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Number of model seeds (0..N-1; default: the "
                                        "preset's, else 5)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (default: the preset's for the "
                                         "set's kind, else 50)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default: the preset's, else 0.01)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size (default: the preset's, else "
                                             "256)."),
    augment: Optional[str] = typer.Option(None, "--augment", help="DSA strategy for training, e.g. flip_rotate "
                                          "(default: the preset's, else none; 'none' turns it off)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Resize both sets (default: the training "
                                             "set's size)."),
    test_limit: Optional[int] = typer.Option(None, "--test-limit-per-class", help="Cap test patches per class (seeded)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the summary (accuracy_mean, ...) as JSON here."),
    save_model_dir: Optional[Path] = typer.Option(None, "--save-model", help="Save the seed-0 model here."),
    device: str = typer.Option("auto", "--device"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads."),
) -> None:
    """Train ARCH on TRAIN once per seed, test on TEST; print accuracy / AUC mean ± std.

    Test patches are put in the training set's recorded view (meta "view") or, for raw training
    patches, in the preset's view (--preset pcam: the centre 32 px of 96-px patches).
    """
    from histodd_fed.atomic import atomic_write_json
    from histodd_fed.logging_setup import progress_enabled
    from histodd_fed.preset import EvalRecipe
    from histodd_fed.runconfig import to_jsonable, write_run_config
    from histodd_fed.studies.tables import pm
    from histodd_fed.training import build_seeded_model, evaluate_sets, save_model, train_classifier

    _threads(threads)
    pre = _load_preset(preset)
    rec = pre.eval if pre is not None else EvalRecipe()
    tr, te = _eval_data(train, test, pre, image_size, test_limit)
    arch_kwargs = dict(rec.arch_kwargs) if arch in (None, rec.arch) else {}
    arch = arch or rec.arch
    seeds = seeds if seeds is not None else rec.seeds
    epochs = epochs if epochs is not None else rec.epochs_for(tr.kind)
    lr = lr if lr is not None else rec.lr
    batch_size = batch_size if batch_size is not None else rec.batch_size
    augment = augment if augment is not None else rec.augmentation
    res = evaluate_sets({str(train): tr}, te, arch, seeds, epochs, lr=lr, batch_size=batch_size,
                        augmentation=augment, arch_kwargs=arch_kwargs, device=device,
                        progress=progress_enabled())[str(train)]
    s = res.summary()
    s.update({"train": str(train), "test": str(test), "epochs": epochs, "augment": augment, "lr": lr,
              "batch_size": batch_size, "arch_kwargs": arch_kwargs, "image_size": tr.image_size, "kind": tr.kind,
              "preset": None if pre is None else pre.name, "view": tr.meta.get("view")})
    typer.echo(f"{arch} on {train} ({len(tr)} patches, {tr.kind}) -> {test} ({len(te)}), {len(res.seeds)} seeds, "
               f"{epochs} epochs")
    typer.echo(f"  accuracy          {pm(s['accuracy_mean'], s['accuracy_std'], digits=2)} %")
    typer.echo(f"  balanced accuracy {pm(s['balanced_accuracy_mean'], s['balanced_accuracy_std'], digits=2)} %")
    typer.echo(f"  ROC AUC           {pm(s['auc_mean'], s['auc_std'], digits=2)} %")
    typer.echo(f"  seconds / epoch   {s['epoch_seconds_mean']:.3f}")
    if json_out is not None:
        atomic_write_json(json_out, to_jsonable(s))
        write_run_config(json_out.parent, "centre-node evaluate", s, name=f"{json_out.stem}.run_config.json")
    if save_model_dir is not None:
        model = build_seeded_model(arch, seed=0, num_classes=tr.num_classes, image_size=tr.image_size, **arch_kwargs)
        model = train_classifier(model, tr, epochs=epochs, lr=lr, batch_size=batch_size, augmentation=augment, seed=0,
                                 device=device, progress=progress_enabled()).model
        save_model(model, save_model_dir, arch=arch, num_classes=tr.num_classes, image_size=tr.image_size,
                   arch_kwargs=arch_kwargs, class_names=tr.class_names,
                   extra={"train": str(train), "epochs": epochs, "view": tr.meta.get("view")})
        typer.echo(f"  model saved to {save_model_dir}")


def _command_line(kind: str) -> str:
    """The command as typed (run from the ``centre-node`` script), else ``centre-node study KIND``."""
    import shlex
    import sys

    if Path(sys.argv[0]).name == "centre-node" and "study" in sys.argv:
        return "centre-node " + shlex.join(sys.argv[1:])
    return f"centre-node study {kind}"


def _study(kind: str, patches: Path, test: Path, preset: str, out: Optional[Path], limit_per_class: Optional[int],
           test_limit_per_class: Optional[int], seeds: Optional[int], epochs: Optional[int], device: Optional[str],
           threads: Optional[int], outer_steps: Optional[int] = None, inner_steps: Optional[int] = None,
           full_epochs: Optional[int] = None, **extra) -> "StudyRun":  # noqa: F821
    from histodd_fed.logging_setup import progress_enabled
    from histodd_fed.studies import StudyRun, load_preset, load_study_data

    _threads(threads)
    p = load_preset(preset, limit_per_class=limit_per_class, test_limit_per_class=test_limit_per_class,
                    device=device, **{"eval.seeds": seeds, "eval.epochs": epochs, "eval.full_epochs": full_epochs,
                                      "distill.outer_steps": outer_steps,
                                      "distill.inner_steps": inner_steps},
                    # --outer-steps: one K for every ipc (the preset's K-per-ipc map no longer applies)
                    outer_steps_by_ipc={} if outer_steps is not None else None)
    if inner_steps is not None:   # a flag the study's distillation recipe does not use: one line
        from centre_node.commands.distill import _refuse_unused
        from histodd_fed.studies.training_sets import distill_config

        _refuse_unused(distill_config(p, p.ipcs[0] if p.ipcs else 10), {"--inner-steps": inner_steps})
    out = out or Path("results") / f"study-{kind}-{p.name}"
    data = load_study_data(patches, test, p)
    run = StudyRun(kind=kind, preset=p, data=data, out_dir=out, progress=progress_enabled(),
                   command=_command_line(kind), sources={"patches": str(patches), "test": str(test), **{
                       k: v for k, v in extra.items() if v is not None}})
    return run


_PATCHES = typer.Option(..., "--patches", help="Real training patches: PatchSet directory or image folder.")
_TEST = typer.Option(..., "--test", help="Test patches: PatchSet directory or image folder.")
_PRESET = typer.Option("cpu", "--preset", help="tiny | cpu | paper, or a YAML path (configs/study-*.yaml).")
_OUT = typer.Option(None, "--out", help="Results folder (default results/study-KIND-PRESET).")
_LIMIT = typer.Option(None, "--limit-per-class", help="Cap training patches per class (seeded).")
_TLIMIT = typer.Option(None, "--test-limit-per-class", help="Cap test patches per class (seeded).")
_SEEDS = typer.Option(None, "--seeds", help="Override the preset's number of evaluation seeds.")
_EPOCHS = typer.Option(None, "--epochs", help="Override the preset's epochs on compressed sets.")
_DEVICE = typer.Option(None, "--device", help="auto | cpu | cuda (overrides the preset).")
_THREADS = typer.Option(None, "--threads", help="torch CPU threads.")
_OUTER = typer.Option(None, "--outer-steps", help="K of every Histo-DD distillation (overrides the preset's K and "
                                                  "its K-per-ipc map).")
_INNER = typer.Option(None, "--inner-steps", help="U of every Histo-DD distillation (overrides the preset).")
_FULL_EPOCHS = typer.Option(None, "--full-epochs", help="Override the preset's epochs on the full real set.")


def _print_results(run, name: str = "results.md") -> None:
    typer.echo((run.out_dir / name).read_text())
    typer.echo(f"results in {run.out_dir}")


@study_app.command("coreset")
def study_coreset(patches: Path = _PATCHES, test: Path = _TEST, preset: str = _PRESET, out: Optional[Path] = _OUT,
                  limit_per_class: Optional[int] = _LIMIT, test_limit_per_class: Optional[int] = _TLIMIT,
                  seeds: Optional[int] = _SEEDS, epochs: Optional[int] = _EPOCHS,
                  methods: Optional[str] = typer.Option(None, "--methods", help="Comma list, e.g. random,histodd,full."),
                  ipcs: Optional[str] = typer.Option(None, "--ipcs", help="Comma list, e.g. 1,10,50."),
                  outer_steps: Optional[int] = _OUTER, inner_steps: Optional[int] = _INNER,
                  full_epochs: Optional[int] = _FULL_EPOCHS, gate: bool = typer.Option(True, "--gate/--no-gate",
                                            help="Run the export gate on every compressed set against the study's "
                                                 "training patches; its verdict is a column of table.md."),
                  device: Optional[str] = _DEVICE, threads: Optional[int] = _THREADS) -> None:
    """Table 1: Random / Herding / Forgetting / Histo-DD / Full at each ipc, with ratio % and the export
    gate's verdict per row (table.md, results.md, accuracy_by_method.png)."""
    from histodd_fed.studies import run_coreset_study

    run = _study("coreset", patches, test, preset, out, limit_per_class, test_limit_per_class, seeds, epochs, device,
                 threads, outer_steps=outer_steps, inner_steps=inner_steps, full_epochs=full_epochs, methods=methods,
                 ipcs=ipcs)
    run_coreset_study(run, _words(methods), _ints(ipcs), gate=gate)
    _print_results(run, "table.md")


@study_app.command("ablation")
def study_ablation(patches: Path = _PATCHES, test: Path = _TEST, preset: str = _PRESET, out: Optional[Path] = _OUT,
                   limit_per_class: Optional[int] = _LIMIT, test_limit_per_class: Optional[int] = _TLIMIT,
                   seeds: Optional[int] = _SEEDS, epochs: Optional[int] = _EPOCHS,
                   ipc: Optional[int] = typer.Option(None, "--ipc"),
                   device: Optional[str] = _DEVICE, threads: Optional[int] = _THREADS) -> None:
    """Table 2: distil with each augmentation (none, stain, rotate, flip, scale, all) and evaluate."""
    from histodd_fed.studies import run_ablation_study

    run = _study("ablation", patches, test, preset, out, limit_per_class, test_limit_per_class, seeds, epochs, device,
                 threads, ipc=ipc)
    run_ablation_study(run, ipc=ipc)
    _print_results(run)


@study_app.command("cross-arch")
def study_cross_arch(patches: Path = _PATCHES, test: Path = _TEST, preset: str = _PRESET, out: Optional[Path] = _OUT,
                     limit_per_class: Optional[int] = _LIMIT, test_limit_per_class: Optional[int] = _TLIMIT,
                     seeds: Optional[int] = _SEEDS, epochs: Optional[int] = _EPOCHS,
                     ipc: Optional[int] = typer.Option(None, "--ipc"),
                     method: str = typer.Option("histodd", "--method", help="Set to transfer (histodd or a coreset)."),
                     device: Optional[str] = _DEVICE, threads: Optional[int] = _THREADS) -> None:
    """Table 3: the distilled set trained on ResNet18 / DenseNet121 / ViT; accuracy and speed-up vs full."""
    from histodd_fed.studies import run_cross_arch_study

    run = _study("cross-arch", patches, test, preset, out, limit_per_class, test_limit_per_class, seeds, epochs,
                 device, threads, ipc=ipc, method=method)
    run_cross_arch_study(run, ipc=ipc, method=method)
    _print_results(run)


@study_app.command("ipc")
def study_ipc(patches: Path = _PATCHES, test: Path = _TEST, preset: str = _PRESET, out: Optional[Path] = _OUT,
              limit_per_class: Optional[int] = _LIMIT, test_limit_per_class: Optional[int] = _TLIMIT,
              seeds: Optional[int] = _SEEDS, epochs: Optional[int] = _EPOCHS,
              methods: Optional[str] = typer.Option(None, "--methods", help="Comma list, e.g. random,histodd,full."),
              ipcs: Optional[str] = typer.Option(None, "--ipcs", help="Comma list (default 10,20,50,100)."),
              device: Optional[str] = _DEVICE, threads: Optional[int] = _THREADS) -> None:
    """Figure 1b: accuracy against images per class."""
    from histodd_fed.studies import run_ipc_study

    run = _study("ipc", patches, test, preset, out, limit_per_class, test_limit_per_class, seeds, epochs, device,
                 threads, methods=methods, ipcs=ipcs)
    run_ipc_study(run, _words(methods), _ints(ipcs))
    _print_results(run)


@study_app.command("figure")
def study_figure(synthetic: Path = typer.Option(..., "--synthetic", help="Synthetic PatchSet directory."),
                 real: Path = typer.Option(..., "--real", help="Real patches (PatchSet directory or image folder)."),
                 initial: Optional[Path] = typer.Option(None, "--initial", help="The initial patches of the synthetic set."),
                 out: Path = typer.Option(Path("results/figure-patches.png"), "--out", help="PNG path."),
                 per_class: int = typer.Option(8, "--per-class"),
                 seed: int = typer.Option(0, "--seed")) -> None:
    """Figure 1a: synthetic vs initial vs real patches per class."""
    from histodd_fed.patchset import PatchSet
    from histodd_fed.studies import patch_grid
    from histodd_fed.training.data import load_patches

    syn = PatchSet.load(synthetic)
    rows = {"synthetic": syn}
    if initial is not None:
        rows["initial"] = load_patches(initial, image_size=syn.image_size)
    from histodd_fed.preprocess import recorded_view

    view = recorded_view(syn)   # the real patches as the set saw them (e.g. the centre crop of PCam)
    rows["real"] = load_patches(real, view=view if view is not None and not view.is_identity else None,
                                image_size=syn.image_size, limit=max(4 * per_class, per_class), seed=seed)
    patch_grid(out, rows, per_class=per_class, seed=seed)
    typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    """Add ``coreset``, ``evaluate`` and the ``study`` group to ``app``."""
    from centre_node.commands.mil import study as mil_study

    # `centre-node study mil` is the same command as `centre-node mil study` (Table 4).
    study_app.command("mil", help="Table 4: MIL heads on distilled per-slide bags vs full bags.")(mil_study)
    app.command("coreset")(coreset)
    app.command("evaluate")(evaluate)
    app.add_typer(study_app, name="study")
