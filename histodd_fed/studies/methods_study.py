"""Study 1 (Table 1: methods x ipc, with ratio %) and study 4 (Figure 1b: accuracy vs ipc)."""

from __future__ import annotations

import logging
import math

from histodd_fed.studies.context import StudyRun
from histodd_fed.studies.plots import grouped_bars, lines
from histodd_fed.studies.tables import markdown_table, pm, write_results
from histodd_fed.studies.training_sets import METHOD_LABELS, build_set, check_methods
from histodd_fed.training.evaluation import SetEvaluation

log = logging.getLogger(__name__)


def _record(study: str, method: str, ipc: int | None, ev: SetEvaluation, n_full: int, epochs: int) -> dict:
    s = ev.summary()
    return {"study": study, "method": method, "ipc": ipc,
            "ratio_pct": 100.0 * s["n_train"] / n_full, "epochs": epochs, **s}


def _evaluate_grid(run: StudyRun, methods: list[str], ipcs: list[int], study: str) -> list[dict]:
    check_methods(methods)
    n_full = len(run.data.train)
    records = []
    for method in methods:
        if method == "full":
            continue
        for ipc in ipcs:
            ps = build_set(method, ipc, run.data, run.preset, run.out_dir, progress=run.progress)
            ev = run.evaluate(f"{method}-ipc{ipc}", ps)
            records.append(_record(study, method, ipc, ev, n_full, run.preset.eval.epochs))
            log.info("%s ipc %d: accuracy %s", method, ipc, pm(ev.stat("accuracy")[0], ev.stat("accuracy")[1]))
    if "full" in methods:
        ev = run.evaluate("full", run.data.train, full=True)
        records.append(_record(study, "full", None, ev, n_full, run.preset.eval.full_epochs))
    return records


def _lookup(records: list[dict], method: str, ipc: int | None, key: str = "accuracy") -> tuple[float, float]:
    for r in records:
        if r["method"] == method and (method == "full" or r["ipc"] == ipc):
            return r[f"{key}_mean"], r[f"{key}_std"]
    return math.nan, math.nan


def _table(records: list[dict], methods: list[str], ipcs: list[int], num_classes: int, n_full: int,
           key: str) -> str:
    header = ["IPC", "Ratio %"] + [METHOD_LABELS[m] for m in methods]
    rows = []
    for ipc in ipcs:
        row = [ipc, f"{100.0 * ipc * num_classes / n_full:.2f}"]
        row += [pm(*_lookup(records, m, ipc, key)) for m in methods]
        rows.append(row)
    return markdown_table(header, rows)


def _notes(run: StudyRun) -> list[str]:
    p, ev = run.preset, run.preset.eval
    return [f"preset `{p.name}`: {p.image_size} px, {len(run.data.train)} training patches "
            f"({run.data.train.class_counts()}), {len(run.data.test)} test patches ({run.data.test.class_counts()})",
            f"evaluation: {ev.arch} {ev.arch_kwargs or ''} trained {ev.epochs} epochs on compressed sets, "
            f"{ev.full_epochs} on the full set, lr {ev.lr}, augmentation {ev.augmentation or 'none'}; "
            f"mean ± std (percent) over {ev.seeds} model seeds; one set per method and ipc (seed {p.seed})",
            "Ratio % = compressed-set size / full training-set size"]


def run_coreset_study(run: StudyRun, methods: list[str] | None = None, ipcs: list[int] | None = None) -> list[dict]:
    """Table 1: every method at every ipc (plus the full set), accuracy and AUC; bar plot."""
    methods = list(methods or run.preset.methods)
    ipcs = [int(i) for i in (ipcs or run.preset.ipcs)]
    run.write_config()
    records = _evaluate_grid(run, methods, ipcs, "coreset")
    c, n = run.data.train.num_classes, len(run.data.train)
    md = "## Accuracy (%)\n\n" + _table(records, methods, ipcs, c, n, "accuracy") + \
         "\n## ROC AUC (%)\n\n" + _table(records, methods, ipcs, c, n, "auc") + \
         "\n## Balanced accuracy (%)\n\n" + _table(records, methods, ipcs, c, n, "balanced_accuracy")
    write_results(run.out_dir, "Methods x images per class (Table 1)", md, records, _notes(run))
    compressed = [m for m in methods if m != "full"]
    series = {METHOD_LABELS[m]: ([_lookup(records, m, i)[0] for i in ipcs], [_lookup(records, m, i)[1] for i in ipcs])
              for m in compressed}
    full = ("Full", _lookup(records, "full", None)[0]) if "full" in methods else None
    grouped_bars(run.out_dir / "accuracy_by_method.png", [f"ipc {i}" for i in ipcs], series, "accuracy (%)",
                 "Accuracy by method and images per class", hline=full)
    return records


def run_ipc_study(run: StudyRun, methods: list[str] | None = None, ipcs: list[int] | None = None) -> list[dict]:
    """Figure 1b: accuracy against images per class (10/20/50/100 by default)."""
    methods = list(methods or run.preset.ipc_curve_methods)
    ipcs = [int(i) for i in (ipcs or run.preset.ipc_curve)]
    run.write_config()
    records = _evaluate_grid(run, methods, ipcs, "ipc")
    c, n = run.data.train.num_classes, len(run.data.train)
    md = "## Accuracy (%)\n\n" + _table(records, methods, ipcs, c, n, "accuracy") + \
         "\n## ROC AUC (%)\n\n" + _table(records, methods, ipcs, c, n, "auc")
    write_results(run.out_dir, "Accuracy vs images per class (Figure 1b)", md, records, _notes(run))
    compressed = [m for m in methods if m != "full"]
    series = {METHOD_LABELS[m]: ([_lookup(records, m, i)[0] for i in ipcs], [_lookup(records, m, i)[1] for i in ipcs])
              for m in compressed}
    full = ("Full", _lookup(records, "full", None)[0]) if "full" in methods else None
    lines(run.out_dir / "accuracy_vs_ipc.png", ipcs, series, "images per class", "accuracy (%)",
          "Accuracy vs images per class", hline=full)
    return records
