"""Summary of a seeded benchmark: mean and 95% t-interval per row, gains over "target alone" paired by seed.

Input: per-seed rows ``{"target", "sources", "seed", "transfer", <metrics>}`` and per-seed faults
``{"target", "seed", "transfer", "centre", "stage", "kind", "fault"}`` (``transfer`` None: every row of that
target and seed; :data:`ALL_TRANSFERS`: every row but "target alone").
Output: ``summary.md``, ``summary.csv`` (one row per target x transfer), ``summary_per_seed.csv``,
``summary.png`` (balanced accuracy with its CI per row). A row some seed could not produce keeps its
place: with the seeds that ran and the faults counted, or, when none ran, as a fault row.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Iterable

import numpy as np

#: the per-seed metrics (column names of summary_per_seed.csv after target/sources/seed/transfer)
SEED_COLS = ["patch_bal_acc", "patch_acc", "patch_auc", "slide_acc", "slide_auc", "epochs", "received_share",
             "lr_scale", "fine_tune_s", "select_s", "bytes", "bytes_vs_full", "patch_bytes", "patch_bytes_vs_full",
             "images", "protocol", "slide_note", "fault"]
#: summary.csv columns
SUMMARY_COLS = ["target", "sources", "transfer", "n_seeds", "n_faults",
                "patch_bal_acc_mean", "patch_bal_acc_ci95_low", "patch_bal_acc_ci95_high",
                "gain_mean", "gain_ci95_low", "gain_ci95_high", "share_of_full_gain",
                "patch_acc_mean", "patch_auc_mean", "patch_auc_ci95_low", "patch_auc_ci95_high",
                "slide_acc_mean", "slide_auc_mean", "slide_auc_ci95_low", "slide_auc_ci95_high",
                "slide_auc_gain_mean", "slide_auc_gain_ci95_low", "slide_auc_gain_ci95_high",
                "slide_share_of_full_gain", "slide_note", "epochs", "received_share", "lr_scale", "fine_tune_s_mean", "select_s_mean",
                "bytes_mean", "bytes_vs_full", "patch_bytes_mean", "patch_bytes_vs_full", "images", "protocol",
                "faults"]
BASE = "target alone"
#: a fault's ``transfer`` when it concerns every transfer row of its study but not "target alone"
ALL_TRANSFERS = "*"


def t_interval(values: Iterable[float], level: float = 0.95) -> tuple[float | None, float | None, float | None]:
    """(mean, low, high): Student-t interval of the mean; (mean, None, None) for one value; Nones for none."""
    v = np.asarray([float(x) for x in values if x is not None and not math.isnan(float(x))], dtype=np.float64)
    if len(v) == 0:
        return None, None, None
    m = float(v.mean())
    if len(v) < 2:
        return m, None, None
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m, m - half, m + half


def row_order(transfer: str) -> tuple:
    """target alone, + ipc ascending, + Full, then anything else."""
    if transfer == BASE:
        return (0, 0, transfer)
    if transfer == "+ Full":
        return (2, 0, transfer)
    digits = "".join(ch for ch in transfer if ch.isdigit())
    return (1 if transfer.startswith("+ ipc") else 3, int(digits) if digits else 0, transfer)


def _num(v: Any) -> float | None:
    if v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _mean(vals: list[Any]) -> float | None:
    xs = [x for x in (_num(v) for v in vals) if x is not None]
    return float(np.mean(xs)) if xs else None


def _distinct(vals: list[Any]) -> str:
    xs = [v for v in vals if v is not None and v != ""]
    return "/".join(str(v) for v in dict.fromkeys(xs))


def summarise(per_seed: list[dict[str, Any]], faults: list[dict[str, Any]], *, expected: dict[str, list[str]],
              sources: dict[str, str]) -> list[dict[str, Any]]:
    """One summary row per target x transfer; ``expected``: target -> the transfers it must show (in
    order), whatever ran; ``sources``: target -> its sources as shown."""
    rows: list[dict[str, Any]] = []
    for tgt, transfers in expected.items():
        mine = [r for r in per_seed if r["target"] == tgt]
        base = {r["seed"]: _num(r.get("patch_bal_acc")) for r in mine if r["transfer"] == BASE}
        base_slide = {r["seed"]: _num(r.get("slide_auc")) for r in mine if r["transfer"] == BASE}
        names = sorted(set(transfers) | {r["transfer"] for r in mine}, key=row_order)
        block = []
        for tr in names:
            rs = [r for r in mine if r["transfer"] == tr and _num(r.get("patch_bal_acc")) is not None]
            fs = [f for f in faults if f["target"] == tgt and (f.get("transfer") in (tr, None)
                                                                or (f.get("transfer") == ALL_TRANSFERS and tr != BASE))]
            row: dict[str, Any] = {"target": tgt, "sources": sources.get(tgt, ""), "transfer": tr,
                                   "n_seeds": len(rs), "n_faults": len(fs), "faults": fault_summary(fs),
                                   "fault_lines": [f"seed {f['seed']}: {f['fault'][:240]}" for f in fs]}
            m, lo, hi = t_interval(r["patch_bal_acc"] for r in rs)
            row.update(patch_bal_acc_mean=m, patch_bal_acc_ci95_low=lo, patch_bal_acc_ci95_high=hi)
            am, alo, ahi = t_interval(_num(r.get("patch_auc")) for r in rs)
            row.update(patch_auc_mean=am, patch_auc_ci95_low=alo, patch_auc_ci95_high=ahi)
            if tr != BASE:
                diffs = [float(r["patch_bal_acc"]) - base[r["seed"]] for r in rs if base.get(r["seed"]) is not None]
                g, glo, ghi = t_interval(diffs)
                row.update(gain_mean=g, gain_ci95_low=glo, gain_ci95_high=ghi, gain_pairs=len(diffs))
            for col in ("patch_acc", "slide_acc", "fine_tune_s", "select_s", "bytes", "patch_bytes"):
                row[f"{col}_mean"] = _mean([r.get(col) for r in rs])
            sm, slo, shi = t_interval(_num(r.get("slide_auc")) for r in rs)
            row.update(slide_auc_mean=sm, slide_auc_ci95_low=slo, slide_auc_ci95_high=shi)
            if tr != BASE:  # slide AUC gain over "target alone", paired by seed
                sd = [_num(r.get("slide_auc")) - base_slide[r["seed"]] for r in rs
                      if _num(r.get("slide_auc")) is not None and base_slide.get(r["seed"]) is not None]
                g, glo, ghi = t_interval(sd)
                row.update(slide_auc_gain_mean=g, slide_auc_gain_ci95_low=glo, slide_auc_gain_ci95_high=ghi)
            row["slide_note"] = _distinct([r.get("slide_note") for r in rs])
            row["bytes_vs_full"] = _mean([r.get("bytes_vs_full") for r in rs])
            row["patch_bytes_vs_full"] = _mean([r.get("patch_bytes_vs_full") for r in rs])
            for col in ("epochs", "received_share", "lr_scale", "images", "protocol"):
                row[col] = _distinct([r.get(col) for r in rs])
            row["status"] = "ok" if rs else "fault"
            block.append(row)
        full = next((r for r in block if r["transfer"] == "+ Full"), None)
        for r in block:
            if full is not None and r["transfer"].startswith("+ ipc") and r.get("gain_mean") is not None \
                    and (full.get("gain_mean") or 0) > 0:  # a share of no gain (or a loss) means nothing
                r["share_of_full_gain"] = r["gain_mean"] / full["gain_mean"]
            if full is not None and r["transfer"].startswith("+ ipc") and r.get("slide_auc_gain_mean") is not None \
                    and (full.get("slide_auc_gain_mean") or 0) > 0:  # likewise for the slide AUC
                r["slide_share_of_full_gain"] = r["slide_auc_gain_mean"] / full["slide_auc_gain_mean"]
        rows.extend(block)
    return rows


def fault_summary(faults: list[dict[str, Any]]) -> str:
    """``"H1 distil blocked (seeds 0, 1); H3 train error (seed 0)"``: who, where, what, which seeds."""
    seen: dict[str, list[int]] = {}
    for f in faults:
        key = " ".join(str(f.get(k) or "-") for k in ("centre", "stage", "kind"))
        seen.setdefault(key, []).append(int(f["seed"]))
    return "; ".join(f"{k} (seed{'s' if len(v) > 1 else ''} {', '.join(map(str, sorted(set(v))))})"
                     for k, v in seen.items())


def _f(v: Any, digits: int = 3) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:,.0f}" if digits == 0 else f"{v:.{digits}f}"
    return str(v)


def _ci(r: dict[str, Any], key: str, digits: int = 3, signed: bool = False) -> str:
    m, lo, hi = r.get(f"{key}_mean"), r.get(f"{key}_ci95_low"), r.get(f"{key}_ci95_high")
    if m is None:
        return "-"
    s = f"{m:+.{digits}f}" if signed else f"{m:.{digits}f}"
    return s + (f" [{lo:+.{digits}f}, {hi:+.{digits}f}]" if signed else f" [{lo:.{digits}f}, {hi:.{digits}f}]") \
        if lo is not None else s


def markdown(rows: list[dict[str, Any]], head: list[str]) -> str:
    cols = ["target", "sources", "transfer", "seeds", "patch bal. acc. [95% CI]", "gain [95% CI, paired]",
            "share of Full's gain", "patch acc.", "patch AUC", "slide acc.", "slide AUC [95% CI]",
            "slide AUC gain [95% CI, paired]", "share of Full's slide gain", "epochs", "received share",
            "lr scale", "fine-tune s", "bytes", "bytes / Full", "patch set / Full's", "faults"]
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        faults = f"{r['n_faults']}" if r["n_faults"] else ""
        if r["status"] == "fault":
            faults = "FAULT: " + (r["faults"] or "no result")
        out.append("| " + " | ".join([
            r["target"], r["sources"], r["transfer"], str(r["n_seeds"]), _ci(r, "patch_bal_acc"),
            "" if r["transfer"] == BASE else _ci(r, "gain", signed=True),
            _f(r.get("share_of_full_gain"), 2), _f(r.get("patch_acc_mean")), _f(r.get("patch_auc_mean")),
            _f(r.get("slide_acc_mean")), _ci(r, "slide_auc"),
            "" if r["transfer"] == BASE else _ci(r, "slide_auc_gain", signed=True),
            _f(r.get("slide_share_of_full_gain"), 2), r.get("epochs") or "-",
            r.get("received_share") or "-", r.get("lr_scale") or "-", _f(r.get("fine_tune_s_mean"), 1), _f(r.get("bytes_mean"), 0),
            _f(r.get("bytes_vs_full"), 4), _f(r.get("patch_bytes_vs_full"), 4), faults]) + " |")
    lines = list(head) + ["", "\n".join(out), ""]
    detail = [f"- {r['target']} {r['transfer']}, {x}" for r in rows for x in r.get("fault_lines", [])]
    if detail:
        lines += ["## Faults", "", "A row some seed could not produce keeps the seeds that ran; a row no seed produced "
                  "is a fault row.", ""] + list(dict.fromkeys(detail)) + [""]
    return "\n".join(lines)


def csv_text(rows: list[dict[str, Any]], cols: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r[c]) for c in cols})
    return buf.getvalue()


def plot(rows: list[dict[str, Any]], title: str) -> bytes:
    """Balanced accuracy (mean and 95% CI over seeds) per row; fault rows marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(rows))
    fig, ax = plt.subplots(figsize=(8.5, 0.9 + 0.32 * n))
    y = np.arange(len(rows))[::-1]
    targets = list(dict.fromkeys(r["target"] for r in rows))
    colours = plt.get_cmap("tab10")
    for yi, r in zip(y, rows):
        c = colours(targets.index(r["target"]) % 10)
        m = r.get("patch_bal_acc_mean")
        if m is None:
            ax.text(0.505, yi, "fault: no result", va="center", fontsize=7, color="red")
            continue
        lo, hi = r.get("patch_bal_acc_ci95_low"), r.get("patch_bal_acc_ci95_high")
        err = None if lo is None else [[m - lo], [hi - m]]
        ax.errorbar([m], [yi], xerr=err, fmt="s" if r["transfer"] == BASE else "o", color=c, capsize=3, ms=5)
    ax.set_yticks(y, [f"{r['target']}: {r['transfer']}" for r in rows], fontsize=7)
    ax.axvline(0.5, color="grey", lw=0.6, ls=":")
    ax.set_xlim(0.45, 1.0)
    ax.set_xlabel("patch balanced accuracy on the target's test split (mean, 95% CI over seeds)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
