"""The replay ledger: bundle ids this node has opened (``ledger.json`` in its key dir).

Checked before an open commits, and updated (atomically, under a file lock) only after a
successful open, so a failed open can be retried and a successful one cannot be replayed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from histodd_fed.atomic import atomic_write_json
from histodd_fed.bundle.errors import KeyFileError, ReplayError

LEDGER_FILE = "ledger.json"


@dataclass
class Ledger:
    """A small JSON file of opened bundle ids."""

    path: Path

    @classmethod
    def in_key_dir(cls, key_dir: str | Path) -> "Ledger":
        return cls(Path(key_dir) / LEDGER_FILE)

    def _read(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        try:
            d = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"{self.path}: unreadable ledger ({exc})") from exc
        if not isinstance(d, dict) or d.get("format") != "histodd-ledger" or not isinstance(d.get("opened"), dict):
            raise KeyFileError(f"{self.path}: not a histodd ledger")
        return d["opened"]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def seen(self, bundle_id: str) -> dict | None:
        return self._read().get(bundle_id)

    def check(self, bundle_id: str, where: str = "bundle") -> None:
        """Raise :class:`ReplayError` if ``bundle_id`` was opened before."""
        prev = self.seen(bundle_id)
        if prev is not None:
            raise ReplayError(f"{where}: bundle {bundle_id} was already opened here on "
                              f"{prev.get('opened', '?')} (replay refused; ledger {self.path})")

    def record(self, bundle_id: str, info: dict) -> None:
        """Add ``bundle_id``; raises :class:`ReplayError` if another open recorded it first."""
        with self._locked():
            opened = self._read()
            if bundle_id in opened:
                raise ReplayError(f"bundle {bundle_id} was already opened here (ledger {self.path})")
            opened[bundle_id] = {**info, "opened": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            atomic_write_json(self.path, {"format": "histodd-ledger", "format_version": 1, "opened": opened})

    @contextlib.contextmanager
    def claim(self, bundle_id: str, info: dict, where: str = "bundle") -> Iterator[None]:
        """Hold the ledger lock: refuse a replay, run the block, record the id only if it succeeds."""
        with self._locked():
            opened = self._read()
            if bundle_id in opened:
                prev = opened[bundle_id]
                raise ReplayError(f"{where}: bundle {bundle_id} was already opened here on "
                                  f"{prev.get('opened', '?')} (replay refused; ledger {self.path})")
            yield
            opened[bundle_id] = {**info, "opened": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            atomic_write_json(self.path, {"format": "histodd-ledger", "format_version": 1, "opened": opened})

    def entries(self) -> dict[str, dict]:
        return dict(self._read())
