"""Transfer-study outputs: table rows, Markdown, CSV, PNG and ``report.json`` in the study dir."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from histodd_fed.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from histodd_fed.federation.coordinator import StudyConfig, StudyOutcome
from histodd_fed.runconfig import to_jsonable, write_run_config

COLUMNS = ["source", "target", "transfer", "images", "patch_acc", "slide_acc", "fine_tune_s", "epochs", "bytes"]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table_rows(outcome: StudyOutcome) -> list[dict[str, Any]]:
    """One flat row per (target, transfer kind): baseline first, then ipc ascending, then full."""
    def order(r: dict[str, Any]) -> tuple:
        mode = r.get("mode")
        return (r.get("target") or "", r.get("source") or "", {"none": 0, "synthetic": 1, "full": 2}.get(mode, 3),
                r.get("ipc") or 0)

    rows = []
    for r in sorted(outcome.rows, key=order):
        mode = r.get("mode")
        transfer = "no transfer" if mode == "none" else ("Full" if mode == "full" else f"ipc {r.get('ipc')}")
        rows.append({"source": r.get("source") or "-", "target": r.get("target"), "transfer": transfer,
                     "images": r.get("images", 0), "patch_acc": r.get("patch_accuracy"),
                     "slide_acc": r.get("slide_accuracy"), "fine_tune_s": r.get("fine_tune_seconds"),
                     "epochs": r.get("epochs"), "bytes": r.get("bytes", 0)})
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "|".join("---" for _ in COLUMNS) + "|\n"
    body = "".join("| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |\n" for r in rows)
    return head + body


def csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r[c] is None else r[c]) for c in COLUMNS})
    return buf.getvalue()


def plot_png(rows: list[dict[str, Any]]) -> bytes:
    """Bar chart of patch and slide accuracy per transfer kind (one group per direction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['source']}->{r['target']}\n{r['transfer']}" if r["source"] != "-" else f"{r['target']}\n{r['transfer']}"
              for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(rows)), 3.6), dpi=100)
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["patch_acc"] or 0 for r in rows], 0.4, label="patch accuracy")
    ax.bar([x + 0.2 for x in xs], [r["slide_acc"] or 0 for r in rows], 0.4, label="slide accuracy")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy on target test split")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_report(cfg: StudyConfig, outcome: StudyOutcome, command: str = "coordinator transfer") -> dict[str, Path]:
    """Write results.md / results.csv / results.png / report.json / run_config.json."""
    out = Path(cfg.study_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(outcome)
    md = [f"# Transfer study {cfg.source} -> {cfg.target}" + (" (both directions)" if cfg.both_directions else ""),
          "", f"Runtime: {cfg.runtime}; preset {cfg.preset}; fine-tuning {cfg.fine_tune_epochs} epochs; "
          f"seed {cfg.seed}; study time {outcome.seconds:.1f} s; messages {outcome.messages}.", "",
          markdown_table(rows)]
    if outcome.faults:
        md += ["", "## Faults", ""] + [f"- {f.line()}" for f in outcome.faults]
    paths = {"markdown": out / "results.md", "csv": out / "results.csv", "png": out / "results.png",
             "json": out / "report.json"}
    atomic_write_text(paths["markdown"], "\n".join(md) + "\n")
    atomic_write_text(paths["csv"], csv_text(rows))
    atomic_write_bytes(paths["png"], plot_png(rows))
    atomic_write_json(paths["json"], {"config": to_jsonable(cfg), "rows": rows, "raw_rows": outcome.rows,
                                      "faults": [to_jsonable(f) for f in outcome.faults],
                                      "centres": outcome.centres, "messages": outcome.messages,
                                      "seconds": outcome.seconds})
    write_run_config(out, command, cfg)
    return paths
