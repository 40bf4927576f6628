"""The ``slides.csv`` manifest (slide_id, path, label, centre, split) and split selection.

``path`` is relative to the manifest's folder (absolute paths are kept). ``label`` is
``normal`` or ``tumour`` (``tumor``, ``0``/``1`` accepted; empty = unknown); ``split`` is
``train`` or ``test`` (empty = ``train``). Only ``slide_id`` and ``path`` are required.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histodd_fed.errors import InputError
from histodd_fed.patchset import PatchSet

CLASS_NAMES = ["normal", "tumour"]
SPLITS = ("train", "test")
_LABEL_ALIASES = {"normal": "normal", "negative": "normal", "0": "normal",
                  "tumour": "tumour", "tumor": "tumour", "positive": "tumour", "1": "tumour"}


@dataclass
class SlideRecord:
    """One slide: id, file, slide-level label (``None`` = unknown), centre and split."""

    slide_id: str
    path: Path
    label: str | None = None
    centre: str | None = None
    split: str = "train"

    @property
    def label_index(self) -> int | None:
        return None if self.label is None else CLASS_NAMES.index(self.label)


def normalise_label(value: str | None, where: str) -> str | None:
    """``normal``/``tumour`` from the accepted spellings; ``None`` for empty."""
    if value is None or str(value).strip() == "":
        return None
    try:
        return _LABEL_ALIASES[str(value).strip().lower()]
    except KeyError:
        raise InputError(f"{where}: unknown label {value!r} (expected normal or tumour)") from None


def read_manifest(path: str | Path, problems: list[dict] | None = None) -> list[SlideRecord]:
    """Parse ``slides.csv``; paths are resolved against the manifest's folder.

    A file-level problem (unreadable, no rows, missing columns) always raises :class:`InputError`.
    A bad row (empty id or path, duplicate id, unknown label or split) raises too, unless a
    ``problems`` list is given: then the row is left out and ``{"slide_id", "path", "error"}``
    (the error naming ``manifest:line``) is appended to it, so a batch can go on without it.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
            fields = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: unreadable slide manifest ({exc})") from exc
    if not rows:
        raise InputError(f"{path}: slide manifest has no rows")
    missing = {"slide_id", "path"} - set(fields)
    if missing:
        raise InputError(f"{path}: slide manifest lacks column(s) {sorted(missing)}")
    out, seen = [], set()
    for i, r in enumerate(rows, start=2):
        where = f"{path}:{i}"
        sid = (r.get("slide_id") or "").strip()
        try:
            if not sid:
                raise InputError(f"{where}: empty slide_id")
            if sid in seen:
                raise InputError(f"{where}: duplicate slide_id {sid!r}")
            p = Path((r.get("path") or "").strip())
            if not str(r.get("path") or "").strip():
                raise InputError(f"{where}: slide {sid!r} has an empty path")
            split = (r.get("split") or "").strip().lower() or "train"
            if split not in SPLITS:
                raise InputError(f"{where}: slide {sid!r} has unknown split {split!r} (expected train or test)")
            label = normalise_label(r.get("label"), f"{where}: slide {sid!r}")
        except InputError as exc:
            if problems is None:
                raise
            problems.append({"slide_id": sid or f"<line {i}>", "path": str(r.get("path") or ""), "error": str(exc)})
            continue
        seen.add(sid)
        out.append(SlideRecord(sid, p if p.is_absolute() else path.parent / p, label,
                               (r.get("centre") or "").strip() or None, split))
    return out


def write_manifest(path: str | Path, records: list[SlideRecord]) -> Path:
    """Write records as ``slides.csv`` (paths relative to its folder when possible)."""
    import io

    from histodd_fed.atomic import atomic_write_text

    path = Path(path)
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(["slide_id", "path", "label", "centre", "split"])
    for r in records:
        try:
            rel = Path(r.path).resolve().relative_to(path.parent.resolve())
        except ValueError:
            rel = Path(r.path)
        wr.writerow([r.slide_id, rel.as_posix(), r.label or "", r.centre or "", r.split])
    return atomic_write_text(path, buf.getvalue())


def select_split(ps: PatchSet, split: str) -> PatchSet:
    """Patches of the slides in ``split`` (``meta["slide_splits"]``); the slide table is kept."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r} (expected train or test)")
    splits = ps.meta.get("slide_splits")
    if not isinstance(splits, dict):
        raise InputError("patch set has no meta['slide_splits'] (not a tiled slide store)")
    wanted = [j for j, sid in enumerate(ps.slide_ids) if splits.get(sid, "train") == split]
    idx = np.flatnonzero(np.isin(ps.slide_index, np.asarray(wanted, dtype=np.int64)))
    return ps.subset(idx)
