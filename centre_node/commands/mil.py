"""`centre-node mil ...`: slide-level MIL (features, train, evaluate, study). Thin: calls histodd_fed.mil."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

mil_app = typer.Typer(help="Slide-level classification: bags of patch features, MIL heads (ABMIL, CLAM-SB, DSMIL, TransMIL).",
                      no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add the ``mil`` sub-group to ``app``."""
    app.add_typer(mil_app, name="mil")


def _split_or_all(ps, split: str):
    from histodd_fed.slides.manifest import select_split

    if split == "all" or not isinstance(ps.meta.get("slide_splits"), dict):
        return ps
    return select_split(ps, split)


def _encoder(encoder: Optional[Path], store, out: Path, seed: int, preset: str, progress: bool):
    """Load ``encoder``; without one, train the centre's ResNet18 on the store's train split first."""
    from histodd_fed.mil.features import load_encoder
    from histodd_fed.mil.study import resolve_preset, train_patch_encoder

    if encoder is not None:
        return load_encoder(encoder, image_size=store.image_size), str(encoder)
    train = _split_or_all(store, "train")
    model, size = train_patch_encoder(train, out / "encoder", resolve_preset(preset), seed=seed, progress=progress)
    typer.echo(f"trained patch encoder -> {out / 'encoder'}")
    return load_encoder(out / "encoder", image_size=size), str(out / "encoder")


@mil_app.command("features")
def features(
    patches: Path = typer.Option(..., "--patches", help="Patch store (real tiles or a per-slide synthetic set)."),
    encoder: Path = typer.Option(..., "--encoder", help="Saved patch classifier directory or a resnet18 weights file."),
    out: Path = typer.Option(..., "--out", help="Folder for the bags (one safetensors file per slide)."),
    split: str = typer.Option("all", "--split", help="train, test or all slides."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Feature cache folder (default OUT/../feature_cache)."),
    batch_size: int = typer.Option(128, "--batch-size"),
) -> None:
    """Encode every slide's patches into a bag of features (cached per slide)."""
    from histodd_fed.logging_setup import progress_enabled
    from histodd_fed.mil.bags import bags_from_patchset, save_bags
    from histodd_fed.mil.features import load_encoder
    from histodd_fed.patchset import PatchSet
    from histodd_fed.runconfig import write_run_config

    ps = _split_or_all(PatchSet.load(patches, mmap=True), split)
    enc = load_encoder(encoder, image_size=ps.image_size, batch_size=batch_size)
    bags = bags_from_patchset(ps, enc, cache or out.parent / "feature_cache", progress=progress_enabled())
    save_bags(bags, out)
    write_run_config(out, "mil features", {"patches": patches, "encoder": encoder, "split": split,
                                           "encoder_sha256": enc.fingerprint})
    typer.echo(f"{len(bags)} bags ({sum(b.n_patches for b in bags)} patches, dim {bags[0].dim}) -> {out}")


@mil_app.command("train")
def train(
    bags_kind: str = typer.Option("real", "--bags", help="real (all tissue patches of each train slide) or synthetic."),
    patches: Path = typer.Option(..., "--patches", help="The centre's real tiled store (train/test slide splits)."),
    synthetic: Optional[Path] = typer.Option(None, "--synthetic", help="Per-slide synthetic set (with --bags synthetic)."),
    arch: str = typer.Option("abmil", "--arch", help="abmil | clam | dsmil | transmil."),
    encoder: Optional[Path] = typer.Option(None, "--encoder", help="Patch encoder; default: train a ResNet18 on the store's train split."),
    out: Path = typer.Option(..., "--out", help="Output folder (one MIL model per seed, metrics.json)."),
    seeds: int = typer.Option(1, "--seeds", help="Number of seeds (0..N-1)."),
    epochs: int = typer.Option(40, "--epochs"),
    lr: float = typer.Option(1e-3, "--lr"),
    hidden: int = typer.Option(64, "--hidden", help="MIL hidden width."),
    preset: str = typer.Option("cpu", "--preset", help="Encoder-training preset when no --encoder (tiny|cpu|gpu)."),
) -> None:
    """Train a MIL head on real or synthetic bags; report slide accuracy / AUC on the test slides."""
    import json

    from histodd_fed.atomic import atomic_write_json
    from histodd_fed.errors import InputError
    from histodd_fed.logging_setup import progress_enabled
    from histodd_fed.mil.bags import bags_from_patchset, bags_nbytes
    from histodd_fed.mil.train import evaluate_mil, format_mean_std, save_mil, train_mil
    from histodd_fed.patchset import PatchSet
    from histodd_fed.runconfig import write_run_config

    if bags_kind not in ("real", "synthetic"):
        raise InputError(f"--bags must be real or synthetic, got {bags_kind!r}")
    if bags_kind == "synthetic" and synthetic is None:
        raise InputError("--bags synthetic needs --synthetic DIR (a per-slide distilled set)")
    show = progress_enabled()
    store = PatchSet.load(patches, mmap=True)
    out.mkdir(parents=True, exist_ok=True)
    write_run_config(out, "mil train", {"bags": bags_kind, "patches": patches, "synthetic": synthetic, "arch": arch,
                                        "encoder": encoder, "seeds": seeds, "epochs": epochs, "lr": lr,
                                        "hidden": hidden, "preset": preset})
    enc, enc_path = _encoder(encoder, store, out, 0, preset, show)
    cache = out / "feature_cache"
    src = PatchSet.load(synthetic) if bags_kind == "synthetic" else _split_or_all(store, "train")
    train_bags = bags_from_patchset(src, enc, cache, progress=show)
    has_test = isinstance(store.meta.get("slide_splits"), dict) and "test" in store.meta["slide_splits"].values()
    test_bags = bags_from_patchset(_split_or_all(store, "test"), enc, cache, progress=show) if has_test else []
    results = []
    for seed in range(seeds):
        res = train_mil(train_bags, arch, epochs=epochs, lr=lr, seed=seed, progress=show, model_kwargs={"hidden": hidden})
        save_mil(res.model, out / f"seed_{seed}", extra={"encoder": enc_path, "bags": bags_kind, "seed": seed})
        row = {"seed": seed, "epoch_seconds": res.mean_epoch_seconds}
        if test_bags:
            row.update(evaluate_mil(res.model, test_bags).to_dict())
        results.append(row)
    summary = {"arch": arch, "bags": bags_kind, "train_bags": len(train_bags), "storage_bytes": bags_nbytes(train_bags),
               "test_bags": len(test_bags), "seeds": results}
    atomic_write_json(out / "metrics.json", summary)
    typer.echo(f"{arch} on {len(train_bags)} {bags_kind} bags ({bags_nbytes(train_bags)} bytes of patches), "
               f"epoch {format_mean_std([r['epoch_seconds'] for r in results], digits=3)} s")
    if test_bags:
        typer.echo(f"test slides ({len(test_bags)}): accuracy {format_mean_std([r['accuracy'] for r in results], 100)} %, "
                   f"AUC {format_mean_std([r['auc'] for r in results], 100)} %")
    typer.echo(json.dumps({"out": str(out)}))


@mil_app.command("evaluate")
def evaluate(
    model: Path = typer.Option(..., "--model", help="A MIL model folder, or a train --out folder (all seed_* inside)."),
    test_slides: Path = typer.Option(..., "--test-slides", help="Real tiled store; its test split (or all slides) is used."),
    encoder: Optional[Path] = typer.Option(None, "--encoder", help="Override the encoder recorded with the model."),
    split: str = typer.Option("test", "--split", help="test, train or all."),
) -> None:
    """Slide-level accuracy and AUC of saved MIL model(s) on real slides (mean ± std over seeds)."""
    from histodd_fed.errors import InputError
    from histodd_fed.logging_setup import progress_enabled
    from histodd_fed.mil.bags import bags_from_patchset
    from histodd_fed.mil.features import load_encoder
    from histodd_fed.mil.train import evaluate_mil, format_mean_std, load_mil
    from histodd_fed.patchset import PatchSet

    dirs = [model] if (model / "mil_model.json").exists() else sorted(model.glob("seed_*"))
    if not dirs:
        raise InputError(f"{model}: no mil_model.json and no seed_* model folders")
    ps = _split_or_all(PatchSet.load(test_slides, mmap=True), split)
    # reuse the feature cache `mil train` wrote (in the train --out folder, the parent of seed_*)
    train_dir = model if not (model / "mil_model.json").exists() else model.parent
    cache_dir = train_dir / "feature_cache" if (train_dir / "feature_cache").is_dir() else model / "feature_cache"
    metrics, cache_enc = [], {}
    for d in dirs:
        m, meta = load_mil(d)
        enc_spec = encoder or meta.get("extra", {}).get("encoder")
        if not enc_spec:
            raise InputError(f"{d}: no encoder recorded; pass --encoder")
        if str(enc_spec) not in cache_enc:
            enc = load_encoder(Path(enc_spec), image_size=ps.image_size)
            cache_enc[str(enc_spec)] = bags_from_patchset(ps, enc, cache_dir, progress=progress_enabled())
            typer.echo(f"features: {enc.images_encoded} patches encoded, the rest from {cache_dir}")
        r = evaluate_mil(m, cache_enc[str(enc_spec)])
        metrics.append(r)
        typer.echo(f"{d.name}: accuracy {100 * r.accuracy:.1f} %, AUC {100 * r.auc:.1f} % on {r.n} slides")
    typer.echo(f"mean ± std over {len(metrics)}: accuracy {format_mean_std([r.accuracy for r in metrics], 100)} %, "
               f"AUC {format_mean_std([r.auc for r in metrics], 100)} %")


@mil_app.command("study")
def study(
    patches: Path = typer.Option(..., "--patches", help="Real tiled store with train/test slide splits."),
    out: Path = typer.Option(..., "--out", help="Output folder (CSV, Markdown, PNG, synthetic sets)."),
    preset: str = typer.Option("cpu", "--preset", help="tiny | cpu | gpu."),
    ipcs: str = typer.Option("10,20,50", "--ipcs", help="Comma-separated images per class per slide."),
    archs: str = typer.Option("abmil,clam,dsmil,transmil", "--archs"),
    seeds: int = typer.Option(1, "--seeds"),
    encoder: Optional[Path] = typer.Option(None, "--encoder", help="Patch encoder; default: train one on the train split."),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads."),
) -> None:
    """Distilled per-slide bags (ipc 10/20/50) vs full bags for every MIL head (Table 4 analogue)."""
    import torch

    from histodd_fed.logging_setup import progress_enabled
    from histodd_fed.mil.study import run_mil_study
    from histodd_fed.patchset import PatchSet

    torch.set_num_threads(threads)
    res = run_mil_study(PatchSet.load(patches), out, ipcs=[int(x) for x in ipcs.split(",") if x.strip()],
                        archs=[a.strip() for a in archs.split(",") if a.strip()], preset=preset,
                        seeds=list(range(seeds)), encoder=encoder, progress=progress_enabled())
    typer.echo(res.markdown)
    typer.echo(f"-> {res.csv_path}, {res.markdown_path}, {res.plot_path}")
