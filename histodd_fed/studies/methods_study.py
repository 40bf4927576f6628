"""Study 1 (Table 1: methods x ipc, with ratio %) and study 4 (Figure 1b: accuracy vs ipc)."""

from __future__ import annotations

import logging
import math
import time

from histodd_fed.atomic import atomic_write_text
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


def _set_facts(ps, gate: bool, reference) -> dict:
    """What a row records about its set besides accuracy: the method its meta names, its drift from the
    start (distilled sets) and, with ``gate``, the export gate's verdict against ``reference``."""
    out = {"set_method": ps.meta.get("method", "-")}
    d = ps.meta.get("drift") or {}
    if d.get("steps"):
        out.update(drift_steps=d["steps"][-1], drift_rms=d["rms_mean"][-1], drift_ssim=d["ssim_mean"][-1],
                   drift_structure=d["structure_mean"][-1])
    if gate:
        from histodd_fed.release.choose import release_verdict

        t = time.perf_counter()
        v = release_verdict(ps, reference)
        out.update(gate_passed=bool(v["passed"]), gate_reason=(v["reasons"] or [""])[0],
                   gate_seconds=round(time.perf_counter() - t, 1))
    return out


def _evaluate_grid(run: StudyRun, methods: list[str], ipcs: list[int], study: str, gate: bool = False) -> list[dict]:
    check_methods(methods)
    n_full = len(run.data.train)
    records = []
    for method in methods:
        if method == "full":
            continue
        for ipc in ipcs:
            t = time.perf_counter()
            ps = build_set(method, ipc, run.data, run.preset, run.out_dir, progress=run.progress)
            build_s = time.perf_counter() - t
            ev = run.evaluate(f"{method}-ipc{ipc}", ps)
            records.append({**_record(study, method, ipc, ev, n_full, run.preset.eval.epochs),
                            "build_seconds": round(build_s, 1), **_set_facts(ps, gate, run.data.train)})
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


def _gate_cell(r: dict) -> str:
    if "gate_passed" not in r:
        return "-"
    return "passes" if r["gate_passed"] else f"BLOCKED: {r['gate_reason']}".replace("|", "/")


def _row_table(records: list[dict], methods: list[str], ipcs: list[int], num_classes: int, n_full: int) -> str:
    """One row per (method, ipc) and Full: accuracy, AUC, balanced accuracy, the set's recorded method, its
    drift from the start (distilled sets) and the export gate's verdict."""
    header = ["method", "IPC", "Ratio %", "set's meta method", "accuracy %", "AUC %", "balanced acc. %",
              "drift from start (RMS / SSIM, at step)", "export gate"]
    rows = []
    for m in methods:
        for ipc in ([None] if m == "full" else ipcs):
            r = next((r for r in records if r["method"] == m and (m == "full" or r["ipc"] == ipc)), None)
            if r is None:
                continue
            drift = (f"{r['drift_rms']:.4f} / {r['drift_ssim']:.3f} @ {r['drift_steps']}" if "drift_rms" in r else "-")
            gate = "- (the real training set)" if m == "full" else _gate_cell(r)
            rows.append([METHOD_LABELS[m], "-" if ipc is None else ipc,
                         "100" if ipc is None else f"{100.0 * ipc * num_classes / n_full:.2f}",
                         r.get("set_method", "-") if m != "full" else "-",
                         pm(r["accuracy_mean"], r["accuracy_std"]), pm(r["auc_mean"], r["auc_std"]),
                         pm(r["balanced_accuracy_mean"], r["balanced_accuracy_std"]), drift, gate])
    return markdown_table(header, rows)


def run_coreset_study(run: StudyRun, methods: list[str] | None = None, ipcs: list[int] | None = None,
                      gate: bool = False) -> list[dict]:
    """Table 1: every method at every ipc (plus the full set), accuracy and AUC; bar plot. With ``gate`` the
    export gate audits every compressed set against the training patches (a column of ``table.md``)."""
    methods = list(methods or run.preset.methods)
    ipcs = [int(i) for i in (ipcs or run.preset.ipcs)]
    run.write_config()
    t0 = time.perf_counter()
    records = _evaluate_grid(run, methods, ipcs, "coreset", gate=gate)
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
    table = (f"# Table 1: methods x images per class, export gate per row\n\n"
             f"`{run.command or 'centre-node study coreset'}` (sources {run.sources}); "
             f"{time.perf_counter() - t0:.0f} s\n\n" + _row_table(records, methods, ipcs, c, n) + "\n"
             + "".join(f"- {line}\n" for line in _notes(run))
             + ("- export gate: `centre-node export`'s full gate (configs/privacy.yaml) on each set against the "
                "study's training patches; coresets are real patches, so it blocks them\n" if gate else "")
             + "- drift: mean over the set's images of the RMS change / SSIM to each image's starting image "
               "(meta \"drift\"), after the last outer step\n"
             + "- plot: accuracy_by_method.png; all columns: results.csv / results.json\n")
    atomic_write_text(run.out_dir / "table.md", table)
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
