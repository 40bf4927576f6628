"""Study 3 (Table 3): a set distilled with the distillation network, trained on other architectures.

For each evaluation architecture: accuracy on the distilled set and on the full set, seconds per
training epoch on each, and the per-epoch speed-up (full / distilled).
"""

from __future__ import annotations

import math

from histodd_fed.studies.context import StudyRun
from histodd_fed.studies.plots import grouped_bars
from histodd_fed.studies.tables import markdown_table, pm, write_results
from histodd_fed.studies.training_sets import METHOD_LABELS, build_set


def run_cross_arch_study(run: StudyRun, archs: dict[str, dict] | None = None, ipc: int | None = None,
                         method: str = "histodd", include_full: bool = True) -> list[dict]:
    """Evaluate the ``method`` set at ``ipc`` (and the full set) on each architecture of the preset."""
    archs = dict(archs or run.preset.cross_archs)
    ipc = int(ipc or run.preset.cross_arch_ipc)
    run.write_config()
    ps = build_set(method, ipc, run.data, run.preset, run.out_dir, progress=run.progress)
    full_epochs = run.preset.cross_arch_full_epochs or run.preset.eval.full_epochs
    records = []
    for label, spec in archs.items():
        arch, kw = spec["arch"], dict(spec.get("arch_kwargs", {}))
        syn = run.evaluate(f"{method}-{label}", ps, arch=arch, arch_kwargs=kw).summary()
        rec = {"study": "cross-arch", "arch_label": label, "arch": arch, "arch_kwargs": str(kw), "method": method,
               "ipc": ipc, "n_train": syn["n_train"], "epochs": run.preset.eval.epochs}
        for k in ("accuracy", "balanced_accuracy", "auc", "epoch_seconds"):
            rec[f"{k}_mean"], rec[f"{k}_std"] = syn[f"{k}_mean"], syn[f"{k}_std"]
        if include_full:
            full = run.evaluate(f"full-{label}", run.data.train, full=True, arch=arch, arch_kwargs=kw,
                                epochs=full_epochs).summary()
            rec.update({"full_n_train": full["n_train"], "full_epochs": full_epochs})
            for k in ("accuracy", "balanced_accuracy", "auc", "epoch_seconds"):
                rec[f"full_{k}_mean"], rec[f"full_{k}_std"] = full[f"{k}_mean"], full[f"{k}_std"]
            rec["speedup_per_epoch"] = (full["epoch_seconds_mean"] / syn["epoch_seconds_mean"]
                                        if syn["epoch_seconds_mean"] else math.nan)
        records.append(rec)
    name = METHOD_LABELS.get(method, method)
    header = ["Architecture", f"{name} acc %", f"{name} AUC %", "s / epoch"]
    if include_full:
        header += ["Full acc %", "Full AUC %", "Full s / epoch", "Speed-up / epoch"]
    rows = []
    for r in records:
        row = [r["arch_label"], pm(r["accuracy_mean"], r["accuracy_std"]), pm(r["auc_mean"], r["auc_std"]),
               f"{r['epoch_seconds_mean']:.3f}"]
        if include_full:
            row += [pm(r["full_accuracy_mean"], r["full_accuracy_std"]), pm(r["full_auc_mean"], r["full_auc_std"]),
                    f"{r['full_epoch_seconds_mean']:.3f}", f"{r['speedup_per_epoch']:.1f}x"]
        rows.append(row)
    ev = run.preset.eval
    notes = [f"preset `{run.preset.name}`: {name} set of {ipc} images per class distilled with "
             f"`{run.preset.distill.get('model', 'resnetap10')}`, {run.preset.image_size} px",
             f"{ev.epochs} epochs on the {name} set, {full_epochs} on the full set ({len(run.data.train)} patches); "
             f"mean ± std over {ev.seeds} seeds; s / epoch measured on device `{run.preset.device}`"]
    write_results(run.out_dir, "Cross-architecture generalisation (Table 3)", markdown_table(header, rows), records, notes)
    series = {name: ([r["accuracy_mean"] for r in records], [r["accuracy_std"] for r in records])}
    if include_full:
        series["Full"] = ([r["full_accuracy_mean"] for r in records], [r["full_accuracy_std"] for r in records])
    grouped_bars(run.out_dir / "cross_arch.png", [r["arch_label"] for r in records], series, "accuracy (%)",
                 f"Cross-architecture accuracy (ipc {ipc})")
    return records
