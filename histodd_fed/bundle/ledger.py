"""The replay ledger: bundles this node has opened (``ledger.json`` in its key dir).

An entry is keyed by (signing key id, bundle id), and records the SHA-256 digest the signature
covers: a bundle id is chosen by its sender, so keying by the bare id would let one trusted centre
burn another centre's id (ledger poisoning). Checked after the signature, before decryption, and
updated (atomically, under a file lock, then the directory fsync'd) only after a successful open,
so a failed open can be retried and a successful one cannot be replayed.

The ledger cannot silently fail open: the first write also writes a marker beside it
(``.ledger.json.state``: when it was initialised and how many entries it holds). A ledger that has
vanished while its marker remains, or that holds fewer entries than the marker records (an old
copy restored), is refused with :class:`LedgerMissingError` until an operator restores it.
Version-1 ledgers (keyed by bundle id alone) are read; their entries still refuse a bundle with the
same id from the same source centre.
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
from histodd_fed.bundle.errors import KeyFileError, LedgerMissingError, ReplayError

LEDGER_FILE = "ledger.json"
LEDGER_VERSION = 2


class _NoLedger:
    """The explicit opt-out of replay protection (tests, benchmarks): ``open_bundle(..., NO_LEDGER)``."""

    def __repr__(self) -> str:
        return "NO_LEDGER"


NO_LEDGER = _NoLedger()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def entry_key(sign_key_id: str, bundle_id: str) -> str:
    return f"{sign_key_id}:{bundle_id}"


@dataclass
class Ledger:
    """A small JSON file of opened bundles, keyed by (signing key id, bundle id)."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @classmethod
    def in_key_dir(cls, key_dir: str | Path) -> "Ledger":
        return cls(Path(key_dir) / LEDGER_FILE)

    @property
    def marker(self) -> Path:
        return self.path.with_name(f".{self.path.name}.state")

    def _marker(self) -> dict | None:
        if not self.marker.exists():
            return None
        try:
            d = json.loads(self.marker.read_text(encoding="utf-8"))
            if not isinstance(d, dict) or d.get("format") != "histodd-ledger-state" or type(d.get("entries")) is not int:
                raise ValueError("not a ledger state marker")
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"{self.marker}: unreadable ledger marker ({exc})") from exc
        return d

    def _read(self) -> dict[str, dict]:
        marker = self._marker()
        if not self.path.exists():
            if marker is not None:
                raise LedgerMissingError(
                    f"{self.path}: replay ledger has vanished (initialised {marker.get('initialised', '?')} with "
                    f"{marker['entries']} entries per {self.marker.name}); restore it from backup - refusing to "
                    "open bundles without it")
            return {}
        try:
            d = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"{self.path}: unreadable ledger ({exc})") from exc
        if not isinstance(d, dict) or d.get("format") != "histodd-ledger" or not isinstance(d.get("opened"), dict) \
                or d.get("format_version") not in (1, LEDGER_VERSION):
            raise KeyFileError(f"{self.path}: not a histodd ledger")
        opened = d["opened"]
        if d["format_version"] == 1:  # keyed by bundle id alone
            opened = {f"legacy:{bid}": {**(e if isinstance(e, dict) else {}), "bundle_id": bid, "legacy": True}
                      for bid, e in opened.items()}
        if marker is not None and len(opened) < marker["entries"]:
            raise LedgerMissingError(
                f"{self.path}: replay ledger holds {len(opened)} entries but {self.marker.name} records "
                f"{marker['entries']} (rolled back to an older copy?); restore the current ledger")
        return opened

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    @staticmethod
    def _find(opened: dict[str, dict], sign_key_id: str, bundle_id: str, digest: str | None,
              source: str | None) -> dict | None:
        hit = opened.get(entry_key(sign_key_id, bundle_id))
        if hit is not None:
            return hit
        for e in opened.values():
            if digest is not None and e.get("digest") == digest:
                return e
            if e.get("legacy") and e.get("bundle_id") == bundle_id and source is not None and e.get("source") == source:
                return e
        return None

    def seen(self, sign_key_id: str, bundle_id: str, digest: str | None = None,
             source: str | None = None) -> dict | None:
        return self._find(self._read(), sign_key_id, bundle_id, digest, source)

    def _refuse(self, prev: dict, bundle_id: str, sign_key_id: str, where: str) -> ReplayError:
        return ReplayError(f"{where}: bundle {bundle_id} signed by key {sign_key_id} was already opened here on "
                           f"{prev.get('opened', '?')} (replay refused; ledger {self.path})")

    def check(self, sign_key_id: str, bundle_id: str, where: str = "bundle", digest: str | None = None,
              source: str | None = None) -> None:
        """Raise :class:`ReplayError` if this (signer key, bundle id) or digest was opened before,
        :class:`LedgerMissingError` if an initialised ledger vanished or was rolled back."""
        prev = self.seen(sign_key_id, bundle_id, digest, source)
        if prev is not None:
            raise self._refuse(prev, bundle_id, sign_key_id, where)

    def _write(self, opened: dict[str, dict]) -> None:
        legacy = {k: v for k, v in opened.items() if v.get("legacy")}
        current = {k: v for k, v in opened.items() if not v.get("legacy")}
        atomic_write_json(self.path, {"format": "histodd-ledger", "format_version": LEDGER_VERSION,
                                      "opened": {**current, **legacy}})
        fsync_dir(self.path.parent)
        prev = self._marker()
        atomic_write_json(self.marker, {"format": "histodd-ledger-state", "ledger": self.path.name,
                                        "initialised": prev.get("initialised", _now()) if prev else _now(),
                                        "entries": len(opened)})
        fsync_dir(self.path.parent)

    def record(self, sign_key_id: str, bundle_id: str, digest: str, info: dict) -> None:
        """Add an entry; raises :class:`ReplayError` if another open recorded it first."""
        with self.claim(sign_key_id, bundle_id, digest, info):
            pass

    @contextlib.contextmanager
    def claim(self, sign_key_id: str, bundle_id: str, digest: str, info: dict,
              where: str = "bundle") -> Iterator[None]:
        """Hold the ledger lock: refuse a replay, run the block, record the entry only if it succeeds."""
        with self._locked():
            opened = self._read()
            prev = self._find(opened, sign_key_id, bundle_id, digest, info.get("source"))
            if prev is not None:
                raise self._refuse(prev, bundle_id, sign_key_id, where)
            yield
            opened[entry_key(sign_key_id, bundle_id)] = {
                **info, "sign_key_id": sign_key_id, "bundle_id": bundle_id, "digest": digest, "opened": _now()}
            self._write(opened)

    def entries(self) -> dict[str, dict]:
        return dict(self._read())
