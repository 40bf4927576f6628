"""Study 2 (Table 2): the augmentation used inside distillation (none, stain, rotate, flip, scale, all)."""

from __future__ import annotations

from histodd_fed.studies.context import StudyRun
from histodd_fed.studies.plots import grouped_bars
from histodd_fed.studies.tables import markdown_table, pm, write_results
from histodd_fed.studies.training_sets import build_set


def run_ablation_study(run: StudyRun, strategies: dict[str, str] | None = None, ipc: int | None = None) -> list[dict]:
    """Distil once per augmentation strategy at ``ipc`` and evaluate each synthetic set identically."""
    strategies = dict(strategies or run.preset.ablation_strategies)
    ipc = int(ipc or run.preset.ablation_ipc)
    run.write_config()
    records = []
    for name, strategy in strategies.items():
        ps = build_set("histodd", ipc, run.data, run.preset, run.out_dir, augmentation=strategy,
                       tag=f"aug-{name}", progress=run.progress)
        ev = run.evaluate(f"histodd-{name}", ps)
        records.append({"study": "ablation", "augmentation": name, "strategy": strategy, "ipc": ipc,
                        "epochs": run.preset.eval.epochs, **ev.summary()})
    rows = [[r["augmentation"], f"`{r['strategy']}`", pm(r["accuracy_mean"], r["accuracy_std"]),
             pm(r["balanced_accuracy_mean"], r["balanced_accuracy_std"]), pm(r["auc_mean"], r["auc_std"])]
            for r in records]
    md = markdown_table(["Augmentation", "DSA strategy", "Accuracy %", "Balanced acc. %", "AUC %"], rows)
    ev = run.preset.eval
    notes = [f"preset `{run.preset.name}`: Histo-DD at {ipc} images per class, {run.preset.image_size} px, "
             f"{len(run.data.train)} real training patches, {len(run.data.test)} test patches",
             f"evaluation: {ev.arch} {ev.epochs} epochs, augmentation {ev.augmentation or 'none'}, "
             f"mean ± std over {ev.seeds} seeds; only the distillation augmentation differs between rows"]
    write_results(run.out_dir, "Augmentation ablation (Table 2)", md, records, notes)
    grouped_bars(run.out_dir / "ablation.png", [r["augmentation"] for r in records],
                 {"accuracy": ([r["accuracy_mean"] for r in records], [r["accuracy_std"] for r in records]),
                  "AUC": ([r["auc_mean"] for r in records], [r["auc_std"] for r in records])},
                 "%", f"Distillation augmentation ablation (ipc {ipc})")
    return records
