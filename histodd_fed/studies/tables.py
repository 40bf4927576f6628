"""Writing study results: Markdown tables, CSV, JSON (all atomic)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Sequence

from histodd_fed.atomic import atomic_write_json, atomic_write_text


def pm(mean: float, std: float | None = None, scale: float = 100.0, digits: int = 1) -> str:
    """``"85.3 ± 1.2"`` (values scaled to percent by default); ``"-"`` for NaN."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    s = f"{mean * scale:.{digits}f}"
    if std is not None and not math.isnan(std):
        s += f" ± {std * scale:.{digits}f}"
    return s


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: str | Path, records: Sequence[dict[str, Any]]) -> Path:
    """Write ``records`` (dicts; columns = union of keys in first-seen order) as CSV."""
    cols: list[str] = []
    for r in records:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in records:
        w.writerow({k: (";".join(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in r.items()})
    return atomic_write_text(path, buf.getvalue())


def write_results(out_dir: str | Path, title: str, markdown: str, records: Sequence[dict[str, Any]],
                  notes: Sequence[str] = ()) -> None:
    """``results.md`` (title, table, notes), ``results.csv`` and ``results.json`` in ``out_dir``."""
    out = Path(out_dir)
    body = f"# {title}\n\n{markdown}\n" + "".join(f"- {n}\n" for n in notes)
    atomic_write_text(out / "results.md", body)
    write_csv(out / "results.csv", records)
    atomic_write_json(out / "results.json", list(records))
