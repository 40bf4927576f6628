"""A JSON ledger file kept under a lock, with a state marker beside it that refuses to fail open.

Used by the replay ledger (:mod:`histodd_fed.bundle.ledger`) and the release ledger
(:mod:`histodd_fed.bundle.releases`). ``FILE`` is written to a temporary file renamed into place,
the directory fsync'd, then the marker ``.FILE.state`` (when it was initialised, how many entries
the file holds) the same way, all under an exclusive ``flock`` on ``.FILE.lock``. A file that has
vanished while its marker remains, or holds fewer entries than the marker records (an older copy
restored), raises :class:`LedgerMissingError`. Deleting both is caught only by an anchor kept
elsewhere (the replay ledger's identity anchor).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from histodd_fed.atomic import atomic_write_json
from histodd_fed.bundle.errors import KeyFileError, LedgerMissingError


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class StateFile:
    """``path`` (a JSON object of format ``fmt``) with its marker ``.NAME.state`` and lock ``.NAME.lock``."""

    path: Path
    fmt: str          # e.g. "histodd-ledger"; the marker's format is fmt + "-state"
    what: str         # e.g. "replay ledger", for messages
    refusing: str     # e.g. "refusing to open bundles without it"

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @property
    def marker(self) -> Path:
        return self.path.with_name(f".{self.path.name}.state")

    def read_marker(self) -> dict | None:
        if not self.marker.exists():
            return None
        try:
            d = json.loads(self.marker.read_text(encoding="utf-8"))
            if not isinstance(d, dict) or d.get("format") != f"{self.fmt}-state" or type(d.get("entries")) is not int:
                raise ValueError(f"not a {self.what} state marker")
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"{self.marker}: unreadable {self.what} marker ({exc})") from exc
        return d

    def vanished(self, marker: dict, hint: str = "restore it from backup") -> LedgerMissingError:
        return LedgerMissingError(
            f"{self.path}: {self.what} has vanished (initialised {marker.get('initialised', '?')} with "
            f"{marker['entries']} entries per {self.marker.name}); {hint} - {self.refusing}")

    def read(self) -> tuple[dict | None, dict | None]:
        """(the parsed file or None if absent, the marker or None); a file missing while its marker
        remains is :class:`LedgerMissingError`, an unreadable one :class:`KeyFileError`."""
        marker = self.read_marker()
        if not self.path.exists():
            if marker is not None:
                raise self.vanished(marker)
            return None, None
        try:
            d = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"{self.path}: unreadable {self.what} ({exc})") from exc
        if not isinstance(d, dict) or d.get("format") != self.fmt:
            raise KeyFileError(f"{self.path}: not a histodd {self.what}")
        return d, marker

    def check_entries(self, n: int, marker: dict | None) -> None:
        """Refuse a file holding fewer entries than its marker records (rolled back)."""
        if marker is not None and n < marker["entries"]:
            raise LedgerMissingError(
                f"{self.path}: {self.what} holds {n} entries but {self.marker.name} records "
                f"{marker['entries']} (rolled back to an older copy?); restore the current {self.what}")

    def write(self, doc: dict, entries: int) -> None:
        """Write ``doc`` then the marker (each atomically, the directory fsync'd after each)."""
        atomic_write_json(self.path, doc)
        fsync_dir(self.path.parent)
        prev = self.read_marker()
        atomic_write_json(self.marker, {"format": f"{self.fmt}-state", "ledger": self.path.name,
                                        "initialised": prev.get("initialised", now_iso()) if prev else now_iso(),
                                        "entries": entries})
        fsync_dir(self.path.parent)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
