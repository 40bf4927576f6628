"""Study plots (matplotlib, Agg backend), written atomically as PNG."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

from histodd_fed.atomic import atomic_write_bytes


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    _figure().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def grouped_bars(path: str | Path, groups: Sequence[str], series: dict[str, tuple[Sequence[float], Sequence[float]]],
                 ylabel: str, title: str, hline: tuple[str, float] | None = None) -> Path:
    """Bars per group (x) and series (colour) with std error bars; optional reference line."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(groups) * max(1, len(series)) / 2), 3.6))
    width = 0.8 / max(1, len(series))
    for k, (name, (means, stds)) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        m = [0 if math.isnan(v) else v * 100 for v in means]
        s = [0 if math.isnan(v) else v * 100 for v in stds]
        ax.bar(xs, m, width, yerr=s, capsize=3, label=name)
    if hline is not None and not math.isnan(hline[1]):
        ax.axhline(hline[1] * 100, color="k", linestyle="--", linewidth=1, label=hline[0])
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def lines(path: str | Path, x: Sequence[float], series: dict[str, tuple[Sequence[float], Sequence[float]]],
          xlabel: str, ylabel: str, title: str, hline: tuple[str, float] | None = None) -> Path:
    """Mean lines with std bands against ``x`` (log-x when it spans a decade)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, (means, stds) in series.items():
        m = [v * 100 for v in means]
        s = [0 if math.isnan(v) else v * 100 for v in stds]
        ax.errorbar(list(x), m, yerr=s, marker="o", capsize=3, label=name)
    if hline is not None and not math.isnan(hline[1]):
        ax.axhline(hline[1] * 100, color="k", linestyle="--", linewidth=1, label=hline[0])
    if len(x) > 1 and max(x) / max(min(x), 1e-9) >= 10:
        ax.set_xscale("log")
    ax.set_xticks(list(x), [str(v) for v in x])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
