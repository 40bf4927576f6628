"""Benchmark transfer studies over patch-store centres: ``coordinator transfer --benchmark pcam-c17``.

For each seed ``s`` (the centres' seed: C1's train subset / split and both pre-trainings; and the
study seed: distillation, coreset and fine-tuning draws) two runs of the ordinary transfer study
(:func:`histodd_fed.federation.coordinator.run_transfer_study`, through whatever runtime
``run_study`` uses - the Flower simulation for the CLI):

1. **main**: C1 -> C2 with Histo-DD at every ipc, Herding (real patches, sent under C1's explicit
   real-data policy ``export-real``), Histo-DD distilled WITH the stain op in the matching
   augmentation at the first ipc (the preset's recipe has none: that row is the "without"), and Full.
2. **norm** (evaluation-side stain ablation): the same C1, C2 with ``stain_normalise_inputs``
   (every image its classifier sees - own train, own test, received - mapped to the reference H&E
   stains, set-level): C2 alone, Histo-DD at the first ipc, Full.

Rows are aggregated over seeds (mean +- std) into ``OUT/results.{md,csv,png}`` and ``report.json``;
each run keeps its own report under ``OUT/seed<s>/<run>/``. Everything is cached (distillations by
data + config hash at the centre, bundles at the coordinator), so a rerun only redoes what changed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from histodd_fed.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from histodd_fed.errors import ConfigError, InputError
from histodd_fed.runconfig import write_run_config

log = logging.getLogger(__name__)
BENCHMARKS = ("pcam-c17",)
#: the stain op added to the matching augmentation in the ablation row
STAIN_OP = "stain"
METRIC_COLS = [("patch_bal_acc", 3), ("patch_auc", 3), ("patch_acc", 3), ("fine_tune_s", 1), ("time_vs_full", 2),
               ("bytes", 0), ("bytes_vs_full", 4), ("images", 0)]


def check_centres(centres: Path, benchmark: str) -> dict[str, Any]:
    """The benchmark folder's manifest (one-line errors for a wrong or incomplete folder)."""
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"--benchmark: unknown benchmark {benchmark!r} (known: {', '.join(BENCHMARKS)})")
    centres = Path(centres)
    mf = centres / "manifest.json"
    if not mf.exists():
        raise InputError(f"{centres}: no manifest.json (make it with centre-node make-pcam-centres)")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{mf}: unreadable ({exc})") from None
    if manifest.get("benchmark") != benchmark:
        raise InputError(f"{mf}: benchmark {manifest.get('benchmark')!r}, not {benchmark!r}")
    for p in ("C1/patchset.json", "C2/train/patchset.json", "C2/test/patchset.json"):
        if not (centres / p).exists():
            raise InputError(f"{centres / p}: missing")
    return manifest


def _augmentation_with_stain(preset_name: str) -> str:
    from histodd_fed.distill.config import DistillConfig
    from histodd_fed.federation.distil_cache import _distill_config_path
    from histodd_fed.federation.presets import get_preset

    p = get_preset(preset_name)
    aug = dict(p.distill_overrides).get("augmentation")
    if aug is None:
        aug = DistillConfig.from_yaml(_distill_config_path(p)).augmentation
    ops = [o for o in str(aug or "").split("_") if o and o != "none"]
    return "_".join([STAIN_OP] + [o for o in ops if o not in ("stain", "stainmatrix")])


def run_benchmark(centres: Path, out: Path, *, ipcs: list[int], seeds: int, run_study: Callable,
                  benchmark: str = "pcam-c17", preset: str = "pcam-c17", norm_preset: str = "pcam-c17-norm",
                  epochs: int = 5, herding_ipc: int | None = 10, stain_ablation: bool = True,
                  eval_norm: bool = True, timeout: float = 1800.0, runtime: str = "simulation",
                  say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark study; returns the aggregated report (also written under ``out``)."""
    from histodd_fed.federation.coordinator import StudyConfig
    from histodd_fed.federation.enrol import enrol
    from histodd_fed.federation.study import table_rows, write_report

    manifest = check_centres(centres, benchmark)
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    centres, out = Path(centres).resolve(), Path(out).resolve()
    cfgs, trust = enrol(out / "federation", {"C1": centres / "C1", "C2": centres / "C2"}, preset=preset)
    first = ipcs[0]
    extras: list[dict[str, Any]] = []
    if herding_ipc:
        extras.append({"name": f"herding{herding_ipc}", "kind": "coreset", "method": "herding", "ipc": herding_ipc})
    if stain_ablation:
        extras.append({"name": f"ipc{first}-stainop", "kind": "variant", "ipc": first,
                       "overrides": {"augmentation": _augmentation_with_stain(preset)}})
    runs = [("main", dict(ipcs=list(ipcs), extras=extras), preset)]
    if eval_norm:
        runs.append(("norm", dict(ipcs=[first], extras=[]), norm_preset))
    per_seed: list[dict[str, Any]] = []
    # C1's explicit release budget for this study: every set it asks for, on every seed (a set
    # with a new seed is a new release; the default budget of 10 would stop a 3-seed study)
    max_releases = seeds * sum(2 * len(kw["ipcs"]) + len(kw["extras"]) + 1 for _, kw, _ in runs)
    t0 = time.perf_counter()
    for s in range(seeds):
        for run, kw, tpreset in runs:
            nodes = []
            for c in cfgs:
                nc = dict(c.to_node_config(), seed=s)
                if c.centre_id == "C1":   # the source's explicit policy: real patches (Full, Herding) may leave
                    nc.update({"export-real": "true", "export-max-ipc": max(max(ipcs), herding_ipc or 0),
                               "export-max-releases": max(int(nc.get("export-max-releases", 0)), max_releases)})
                else:
                    nc["preset"] = tpreset
                nodes.append(nc)
            cfg = StudyConfig(source="C1", target="C2", full=True, fine_tune_epochs=epochs, seed=s, preset=tpreset,
                              study_dir=out / f"seed{s}" / run, trust=trust, runtime=runtime,
                              reply_timeout=timeout, identity_timeout=timeout, **kw)
            ts = time.perf_counter()
            say(f"[{benchmark}] seed {s} run {run}: ipc {kw['ipcs']}, extras {[e['name'] for e in kw['extras']]}, "
                f"target preset {tpreset}")
            outcome = run_study(cfg, nodes)
            write_report(cfg, outcome, command=f"coordinator transfer --benchmark {benchmark} (seed {s}, {run})")
            for r in table_rows(outcome):
                per_seed.append(dict(r, seed=s, run=run, label=_label(r, run)))
            for f in outcome.faults:
                per_seed.append({"seed": s, "run": run, "fault": f.line()})
            say(f"[{benchmark}] seed {s} run {run}: {time.perf_counter() - ts:.0f}s, {len(outcome.faults)} fault(s)")
    rows = aggregate([r for r in per_seed if "fault" not in r])
    faults = [r for r in per_seed if "fault" in r]
    report = {"benchmark": benchmark, "centres": str(centres), "manifest": {k: manifest.get(k) for k in (
        "target_domain", "target_train_per_class", "seed", "limit_per_class", "stain_angle_deg")},
        "ipcs": list(ipcs), "seeds": seeds, "preset": preset, "norm_preset": norm_preset, "epochs": epochs,
        "extras": extras, "rows": rows, "per_seed": [r for r in per_seed if "fault" not in r], "faults": faults,
        "seconds": round(time.perf_counter() - t0, 1)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "results.md", markdown(report))
    atomic_write_text(out / "results.csv", csv_text(rows))
    atomic_write_bytes(out / "results.png", plot(report))
    write_run_config(out, f"coordinator transfer --benchmark {benchmark}",
                     {k: v for k, v in report.items() if k not in ("rows", "per_seed")})
    return report


def _label(r: dict[str, Any], run: str) -> str:
    t = str(r["transfer"])
    if t.endswith("-stainop"):
        t = t[: -len("-stainop")].replace("ipc", "ipc ") + ", stain op in matching"
    if t.startswith("herding"):
        t = "Herding " + t[len("herding"):]
    if run == "norm":
        t += ", C2 inputs stain-normalised"
    return t


def _order(label: str) -> tuple:
    norm = "stain-normalised" in label
    base = label.split(", C2 inputs")[0]
    kind = 0 if base == "no transfer" else 3 if base == "Full" else 2 if "real" in base or "herding" in base else 1
    digits = "".join(ch for ch in base if ch.isdigit())
    return (norm, kind, int(digits) if digits else 0, base)


def aggregate(per_seed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per row label."""
    labels = sorted({r["label"] for r in per_seed}, key=_order)
    rows = []
    for lab in labels:
        rs = [r for r in per_seed if r["label"] == lab]
        row: dict[str, Any] = {"transfer": lab, "n_seeds": len(rs)}
        for col, _ in METRIC_COLS:
            vals = [float(r[col]) for r in rs if r.get(col) is not None]
            row[col] = float(np.mean(vals)) if vals else None
            row[col + "_std"] = float(np.std(vals)) if len(vals) > 1 else (0.0 if vals else None)
            row[col + "_all"] = vals
        rows.append(row)
    return rows


def _pm(r: dict[str, Any], col: str, digits: int) -> str:
    v, s = r.get(col), r.get(col + "_std")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:.{digits}f} ± {s:.{digits}f}" if s is not None else f"{v:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    cols = [("transfer", None), ("images", 0), ("patch_bal_acc", 3), ("patch_auc", 3), ("fine_tune_s", 1),
            ("time_vs_full", 2), ("bytes", 0), ("bytes_vs_full", 4)]
    head = "| " + " | ".join(c for c, _ in cols) + " |\n|" + "|".join("---" for _ in cols) + "|\n"
    body = "".join("| " + " | ".join(str(r["transfer"]) if d is None else _pm(r, c, d) for c, d in cols) + " |\n"
                   for r in report["rows"])
    m = report["manifest"]
    lines = [f"# Transfer study: {report['benchmark']} (C1 -> C2)", "",
             f"C2 = PCam valid re-stained to Camelyon17 domain {m.get('target_domain')}, "
             f"{m.get('target_train_per_class')} labelled train patches per class; preset {report['preset']}; "
             f"fine-tuning {report['epochs']} epochs; mean ± std over {report['seeds']} seed(s); "
             f"{report['seconds']:.0f} s.", "", head + body]
    if report["faults"]:
        lines += ["## Faults", ""] + [f"- seed {f['seed']} {f['run']}: {f['fault']}" for f in report["faults"]]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    fields = ["transfer", "n_seeds"] + [f for c, _ in METRIC_COLS for f in (c, c + "_std")]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in fields})
    return buf.getvalue()


def plot(report: dict[str, Any]) -> bytes:
    """Balanced accuracy and AUC (mean ± std) per row; bytes relative to Full (log)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 1.4]})
    y = np.arange(len(rows))[::-1]
    for k, (col, name) in enumerate([("patch_bal_acc", "balanced accuracy"), ("patch_auc", "AUC")]):
        v = [np.nan if r.get(col) is None else r[col] for r in rows]
        e = [0 if r.get(col + "_std") is None else r[col + "_std"] for r in rows]
        ax.barh(y + (0.2 if k == 0 else -0.2), v, 0.4, xerr=e, label=name, capsize=2)
    ax.set_yticks(y, [r["transfer"] for r in rows], fontsize=7)
    ax.axvline(0.5, color="grey", lw=0.6, ls=":")
    ax.set_xlim(0.3, 1.0)
    ax.set_xlabel(f"C2 test patches (mean ± std, {report['seeds']} seeds)")
    ax.legend(fontsize=7, loc="lower right")
    b = [np.nan if r.get("bytes_vs_full") is None else max(r["bytes_vs_full"], 1e-6) for r in rows]
    ax2.barh(y, b, 0.6, color="tab:gray")
    ax2.set_xscale("log")
    ax2.set_yticks(y, [""] * len(rows))
    ax2.set_xlabel("bytes sent / Full (log)")
    fig.suptitle(f"{report['benchmark']}: C1 -> C2 transfer", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
