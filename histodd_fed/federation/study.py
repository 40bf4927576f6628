"""Transfer-study outputs: table rows, Markdown, CSV, PNG and ``report.json`` in the study dir."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from histodd_fed.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from histodd_fed.federation.coordinator import StudyConfig, StudyOutcome
from histodd_fed.runconfig import to_jsonable, write_run_config

COLUMNS = ["source", "target", "transfer", "protocol", "images", "patch_bal_acc", "patch_auc", "slide_acc",
           "slide_auc", "fine_tune_s", "received_s", "epochs", "bytes", "time_vs_full", "bytes_vs_full"]
#: extra CSV columns (not in the printed table)
CSV_EXTRA = ["patch_acc", "slide_bal_acc", "slide_acc_argmax", "slide_threshold", "slide_images", "train_total",
             "received_epochs", "sequential_replay", "slide_encoder"]
PROTOCOL_ORDER = {"union": 0, "sequential": 1, "received": 2}
METRICS = [("patch_bal_acc", "patch balanced acc."), ("patch_auc", "patch AUC"),
           ("slide_acc", "slide accuracy"), ("slide_auc", "slide AUC")]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table_rows(outcome: StudyOutcome) -> list[dict[str, Any]]:
    """One flat row per (target, protocol, transfer kind): per protocol, baseline first, then ipc
    ascending, then full.

    ``received_s``: seconds the target spent training on the received data ALONE (the received-only
    phase of the "sequential" / "received" protocols: classifier + CLAM, the row's epochs). A
    "union" row has no such phase; it shows the same row's value from another protocol of the study
    when there is one (the same received sets, so the same cost). ``time_vs_full`` = ``received_s``
    / the Full row's (same direction): the cost of the received data alone, relative to the source's
    full real set (left empty when not measured). ``bytes_vs_full``: bytes relative to Full.
    """
    def order(r: dict[str, Any]) -> tuple:
        mode = r.get("mode")
        return (r.get("target") or "", PROTOCOL_ORDER.get(r.get("fine_tune_protocol"), 9), r.get("source") or "",
                {"none": 0, "synthetic": 1, "coreset": 2, "full": 3}.get(mode, 4), r.get("ipc") or 0, r.get("name") or "")

    rows = []
    for r in sorted(outcome.rows, key=order):
        mode = r.get("mode")
        transfer = "no transfer" if mode == "none" else ("Full" if mode == "full" else f"ipc {r.get('ipc')}")
        short = str(r.get("name") or "").split("-", 1)[-1]
        if mode == "coreset":  # real patches (a coreset), sent under the source's real-data policy
            transfer = f"{short} (real patches)"
        elif mode == "synthetic" and short not in ("", f"ipc{r.get('ipc')}"):  # a distillation variant
            transfer = short
        rows.append({"source": r.get("source") or "-", "target": r.get("target"), "transfer": transfer,
                     "protocol": r.get("fine_tune_protocol") or "-",
                     "images": r.get("images", 0), "patch_acc": r.get("patch_accuracy"),
                     "patch_bal_acc": r.get("patch_balanced_accuracy"), "patch_auc": r.get("patch_auc"),
                     "slide_acc": r.get("slide_accuracy"), "slide_auc": r.get("slide_auc"),
                     "slide_bal_acc": r.get("slide_balanced_accuracy"), "slide_images": r.get("slide_images"),
                     "slide_acc_argmax": r.get("slide_accuracy_argmax"), "slide_threshold": r.get("slide_threshold"),
                     "fine_tune_s": r.get("fine_tune_seconds"), "received_s": r.get("received_seconds"),
                     "epochs": r.get("epochs"), "bytes": r.get("bytes", 0), "patch_bytes": r.get("patch_bytes"),
                     "train_total": r.get("train_total"),
                     "received_epochs": r.get("received_epochs"), "sequential_replay": r.get("sequential_replay"),
                     "slide_encoder": r.get("slide_encoder"),
                     "time_vs_full": None, "bytes_vs_full": None})
    measured: dict[tuple, float] = {}
    for r in rows:
        if r["received_s"] is not None:
            measured.setdefault((r["source"], r["target"], r["transfer"]), float(r["received_s"]))
    for r in rows:
        if r["received_s"] is None and r["transfer"] != "no transfer":
            r["received_s"] = measured.get((r["source"], r["target"], r["transfer"]))
    fulls = {(r["source"], r["target"], r["protocol"]): r for r in rows if r["transfer"] == "Full"}
    for r in rows:
        f = fulls.get((r["source"], r["target"], r["protocol"]))
        if f is None or r["transfer"] == "no transfer":
            continue
        if f.get("received_s") and r.get("received_s") is not None:
            r["time_vs_full"] = round(float(r["received_s"]) / float(f["received_s"]), 3)
        if f.get("bytes"):
            r["bytes_vs_full"] = round(float(r["bytes"] or 0) / float(f["bytes"]), 4)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "|".join("---" for _ in COLUMNS) + "|\n"
    body = "".join("| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |\n" for r in rows)
    notes = list(dict.fromkeys(  # once per direction, however many protocols
        f"Full {r['source']}->{r['target']}: {r['images']} of the source's {r['train_total']} real train "
        f"patches (capped by the preset's max_train_patches)"
        for r in rows if r["transfer"] == "Full" and r.get("train_total") and r["train_total"] > r["images"]))
    if any(r.get("received_s") is not None for r in rows):
        notes.append("received_s: seconds of training on the received data alone (the sequential protocol's "
                     "first phase, classifier + CLAM; a union row shows the same received sets' value); "
                     "time_vs_full = received_s / Full's")
    longer = [f"{r['transfer']}: {r['received_epochs']}" for r in rows if r.get("received_epochs") is not None
              and r.get("epochs") is not None and int(r["received_epochs"]) != int(r["epochs"])]
    if longer:
        notes.append("sequential: the classifier's received-only phase ran more epochs than the row's to reach "
                     f"the preset's minimum number of steps ({', '.join(longer)} epochs)")
    replay = sorted({float(r["sequential_replay"]) for r in rows if r.get("sequential_replay")})
    if replay:
        notes.append("sequential: the own phase replays the received set at "
                     f"{'/'.join(f'{x:g}' for x in replay)} of each epoch")
    if any(r.get("slide_encoder") == "fine_tuned" for r in rows):
        notes.append("slide columns: CLAM on each row's own fine-tuned classifier (the one its patch columns "
                     "score): that row's own train, received and test bags re-encoded with it (preset "
                     "slide_encoder: fine_tuned)")
    if any(r.get("slide_threshold") is not None for r in rows):
        shifted = [f"{r['transfer']} ({r['protocol']}) {_fmt(r['slide_acc_argmax'])} at 0.5 "
                   f"(threshold {_fmt(r['slide_threshold'])})"
                   for r in rows if r.get("slide_threshold") is not None and abs(float(r["slide_threshold"]) - 0.5) > 1e-9]
        notes.append("slide_acc: tumour threshold calibrated on the target's own train slides, the same way for "
                     "every row" + (f"; uncalibrated: {', '.join(shifted)}" if shifted else " (0.5 kept everywhere)"))
    return head + body + "".join(f"\nNote: {n}." for n in notes) + ("\n" if notes else "")


def csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    fields = COLUMNS + CSV_EXTRA
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r[c]) for c in fields})
    return buf.getvalue()


def plot_png(rows: list[dict[str, Any]]) -> bytes:
    """Left: the four metrics per transfer kind; right: fine-tune time and bytes relative to Full."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def val(v: Any) -> float:
        return float("nan") if v is None else float(v)

    several = len({r["protocol"] for r in rows}) > 1
    labels = [(f"{r['source']}->{r['target']}\n{r['transfer']}" if r["source"] != "-" else f"{r['target']}\n{r['transfer']}")
              + (f"\n{r['protocol']}" if several else "") for r in rows]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(9, 2.2 * len(rows) + 3), 3.8), dpi=100,
                                  gridspec_kw={"width_ratios": [3, 2]})
    xs = np.arange(len(rows))
    w = 0.8 / len(METRICS)
    for k, (key, name) in enumerate(METRICS):
        ys = [val(r.get(key)) for r in rows]
        bars = ax.bar(xs + (k - (len(METRICS) - 1) / 2) * w, np.nan_to_num(ys, nan=0.0), w, label=name)
        for bar, y in zip(bars, ys):
            ax.text(bar.get_x() + bar.get_width() / 2, (0 if np.isnan(y) else y) + 0.01,
                    "-" if np.isnan(y) else f"{y:.2f}", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.axhline(0.5, color="grey", lw=0.6, ls=":")
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_ylim(0, 1.18)
    ax.set_ylabel("on the target's real test split")
    ax.set_title("accuracy (chance = 0.5 for balanced acc. / AUC)", fontsize=8)
    ax.legend(fontsize=6, ncol=4, loc="upper center")
    rel = [r for r in rows if r["transfer"] != "no transfer"]
    rx = np.arange(len(rel))
    t = [val(r.get("time_vs_full")) for r in rel]
    b = [val(r.get("bytes_vs_full")) for r in rel]
    ax2.bar(rx - 0.2, np.nan_to_num(t, nan=0.0), 0.4, label="training on received data / Full")
    ax2.bar(rx + 0.2, np.nan_to_num(b, nan=0.0), 0.4, label="bytes sent / Full")
    for x, y in list(zip(rx - 0.2, t)) + list(zip(rx + 0.2, b)):
        if not np.isnan(y) and y > 0:
            ax2.text(x, y * 1.1, f"{y:.2g}", ha="center", va="bottom", fontsize=6)
    ax2.set_yscale("log")
    ax2.set_xticks(rx, [f"{r['transfer']}\n{r['images']} img" + (f"\n{r['protocol']}" if several else "")
                        for r in rel], fontsize=7)
    ax2.set_title("cost relative to Full (log)", fontsize=8)
    ax2.legend(fontsize=6)
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
    sources = "+".join(cfg.source_list()) if hasattr(cfg, "source_list") else cfg.source
    md = [f"# Transfer study {sources} -> {cfg.target}" + (" (both directions)" if cfg.both_directions else "")
          + (" (sources pooled)" if len(sources.split("+")) > 1 else ""),
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
                                      "seconds": outcome.seconds,
                                      # each centre's signed statements (nonce, centre, run, node, reply
                                      # digest): who answered what, checkable with its public key
                                      "attestations": getattr(outcome, "attestations", [])})
    write_run_config(out, command, cfg)
    return paths
