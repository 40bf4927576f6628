"""The replay ledger: bundles this node has opened (``ledger.json`` in its key dir).

An entry is keyed by (signing key id, bundle id), and records the SHA-256 digest the signature
covers: a bundle id is chosen by its sender, so keying by the bare id would let one trusted centre
burn another centre's id (ledger poisoning). Checked after the signature, before decryption, and
updated (atomically, under a file lock, then the directory fsync'd) only after a successful open,
so a failed open can be retried and a successful one cannot be replayed.

The ledger cannot silently fail open:

- a state marker (``.ledger.json.state``, :mod:`histodd_fed.bundle.statefile`) refuses a ledger that
  vanished or holds fewer entries than recorded (an old copy restored);
- the **identity anchors it**: a key dir made (or re-keyed) by this version binds
  ``replay_ledger: required`` into its passphrase-sealed key files (authenticated, so it cannot be
  edited out without the passphrase; for clear keys, into ``identity.json``), and keygen writes
  the first, empty ledger. For such an identity, its own ``KEYDIR/ledger.json`` missing - marker or
  not - is :class:`LedgerMissingError`;
- the ledger is **signed** with the centre's Ed25519 key on every write, and an anchored ledger
  without a valid signature is refused, so an empty ledger put in its place does not reset it.

Only ``centre-node ledger reset`` (:meth:`Ledger.reset`: unlocked keys, a reason, a line appended to
``ledger-resets.log``) starts a new ledger; it refuses every bundle created before the reset
(``not_before``), whose earlier opening may have been lost with the old ledger.
Version-1 ledgers (keyed by bundle id alone) are read; their entries still refuse a bundle with the
same id from the same source centre.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from cryptography.exceptions import InvalidSignature

from histodd_fed.bundle.errors import KeyFileError, LedgerMissingError, ReplayError
from histodd_fed.bundle.statefile import StateFile, fsync_dir, now_iso

if TYPE_CHECKING:
    from histodd_fed.bundle.identity import Identity

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.json"
RESET_LOG = "ledger-resets.log"
LEDGER_VERSION = 3
READ_VERSIONS = (1, 2, 3)
SIG_DOMAIN = b"histodd-ledger/v3/signature\x00"

__all__ = ["LEDGER_FILE", "Ledger", "NO_LEDGER", "RESET_LOG", "entry_key", "fsync_dir"]


class _NoLedger:
    """The explicit opt-out of replay protection (tests, benchmarks): ``open_bundle(..., NO_LEDGER)``."""

    def __repr__(self) -> str:
        return "NO_LEDGER"


NO_LEDGER = _NoLedger()


def entry_key(sign_key_id: str, bundle_id: str) -> str:
    return f"{sign_key_id}:{bundle_id}"


def _signed_bytes(doc: dict) -> bytes:
    body = {k: v for k, v in doc.items() if k != "signature"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return SIG_DOMAIN + hashlib.sha256(canon).digest()


@dataclass
class Ledger:
    """A small JSON file of opened bundles, keyed by (signing key id, bundle id).

    ``Ledger(path)`` reads and checks the marker only; :meth:`bound` (``open_bundle`` does it) adds
    the identity: writes are signed, and for the identity's own anchored ledger, existence and
    signature are required."""

    path: Path
    signer: "Identity | None" = field(default=None, repr=False)
    required: bool = False

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @classmethod
    def in_key_dir(cls, key_dir: str | Path) -> "Ledger":
        return cls(Path(key_dir) / LEDGER_FILE)

    def bound(self, identity: "Identity") -> "Ledger":
        """This ledger as ``identity`` keeps it (signed writes; required if it is the anchored one)."""
        own = identity.key_dir is not None and self.path.resolve() == (Path(identity.key_dir) / LEDGER_FILE).resolve()
        return Ledger(self.path, signer=identity, required=bool(identity.replay_ledger and own))

    @property
    def _state(self) -> StateFile:
        return StateFile(self.path, "histodd-ledger", "replay ledger", "refusing to open bundles without it")

    @property
    def marker(self) -> Path:
        return self._state.marker

    def _reset_hint(self) -> str:
        return (f"restore it from backup, or after a real loss run `centre-node ledger reset --keys "
                f"{self.path.parent} --reason TEXT` (logged; bundles created before the reset stay refused)")

    # ------------------------------------------------------------------ reading
    def _load(self) -> tuple[dict[str, dict], dict]:
        """(entries, the ledger document) after every check; an absent, unanchored ledger is empty."""
        marker = self._state.read_marker()
        if not self.path.exists():
            if marker is not None:
                raise self._state.vanished(marker, self._reset_hint())
            if self.required:
                raise LedgerMissingError(
                    f"{self.path}: replay ledger has vanished, and the identity in {self.path.parent} anchors one "
                    f"(required since keygen); {self._reset_hint()} - refusing to open bundles without it")
            return {}, {}
        d, marker = self._state.read()
        if d is None or not isinstance(d.get("opened"), dict) or d.get("format_version") not in READ_VERSIONS:
            raise KeyFileError(f"{self.path}: not a histodd ledger")
        if self.required:
            self._verify(d)
        opened = d["opened"]
        if d["format_version"] == 1:  # keyed by bundle id alone
            opened = {f"legacy:{bid}": {**(e if isinstance(e, dict) else {}), "bundle_id": bid, "legacy": True}
                      for bid, e in opened.items()}
        self._state.check_entries(len(opened), marker)
        return opened, d

    def _verify(self, d: dict) -> None:
        sig = d.get("signature")
        pub = self.signer.public
        if not isinstance(sig, dict):
            raise KeyFileError(f"{self.path}: replay ledger is not signed by this centre's key (replaced by hand?); "
                               f"{self._reset_hint()}")
        try:
            raw = base64.b64decode(str(sig.get("ed25519")), validate=True)
            if sig.get("sign_key_id") != pub.sign_key_id:
                raise InvalidSignature
            pub.verify_key().verify(raw, _signed_bytes(d))
        except (InvalidSignature, ValueError):
            raise KeyFileError(f"{self.path}: replay ledger signature does not verify with this centre's key "
                               f"{pub.sign_key_id} (edited or replaced); {self._reset_hint()}") from None

    def _read(self) -> dict[str, dict]:
        return self._load()[0]

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

    def _guard(self, opened: dict, doc: dict, sign_key_id: str, bundle_id: str, where: str, digest: str | None,
               source: str | None, created: str | None) -> None:
        prev = self._find(opened, sign_key_id, bundle_id, digest, source)
        if prev is not None:
            raise self._refuse(prev, bundle_id, sign_key_id, where)
        nb = doc.get("not_before")
        if nb and created is not None:
            from histodd_fed.bundle.format import parse_created

            t, limit = parse_created(created), parse_created(nb)
            if t is None or limit is None or t <= limit:
                raise ReplayError(f"{where}: bundle {bundle_id} was created {created}, not after this ledger was reset "
                                  f"on {nb} (an earlier opening may have been lost with the old ledger: replay "
                                  "refused; ask the sender to re-seal it)")

    def check(self, sign_key_id: str, bundle_id: str, where: str = "bundle", digest: str | None = None,
              source: str | None = None, created: str | None = None) -> None:
        """Raise :class:`ReplayError` if this (signer key, bundle id) or digest was opened before (or the
        bundle predates a reset), :class:`LedgerMissingError` / :class:`KeyFileError` if the ledger
        vanished, was rolled back or replaced."""
        opened, doc = self._load()
        self._guard(opened, doc, sign_key_id, bundle_id, where, digest, source, created)

    # ------------------------------------------------------------------ writing
    def _write(self, opened: dict[str, dict], doc: dict | None = None) -> None:
        legacy = {k: v for k, v in opened.items() if v.get("legacy")}
        current = {k: v for k, v in opened.items() if not v.get("legacy")}
        out = {"format": "histodd-ledger", "format_version": LEDGER_VERSION, "opened": {**current, **legacy}}
        for k in ("not_before", "resets"):
            if doc and k in doc:
                out[k] = doc[k]
        if self.signer is not None:
            sig = self.signer.sign(_signed_bytes(out))
            out["signature"] = {"sign_key_id": self.signer.public.sign_key_id,
                                "ed25519": base64.b64encode(sig).decode("ascii")}
        self._state.write(out, len(opened))

    def record(self, sign_key_id: str, bundle_id: str, digest: str, info: dict) -> None:
        """Add an entry; raises :class:`ReplayError` if another open recorded it first."""
        with self.claim(sign_key_id, bundle_id, digest, info):
            pass

    @contextlib.contextmanager
    def claim(self, sign_key_id: str, bundle_id: str, digest: str, info: dict,
              where: str = "bundle") -> Iterator[None]:
        """Hold the ledger lock: refuse a replay, run the block, record the entry only if it succeeds."""
        with self._state.locked():
            opened, doc = self._load()
            self._guard(opened, doc, sign_key_id, bundle_id, where, digest, info.get("source"), info.get("created"))
            yield
            opened[entry_key(sign_key_id, bundle_id)] = {
                **info, "sign_key_id": sign_key_id, "bundle_id": bundle_id, "digest": digest, "opened": now_iso()}
            self._write(opened, doc)

    def entries(self) -> dict[str, dict]:
        return dict(self._read())

    def initialise(self) -> None:
        """Write the first, empty (signed) ledger if there is none (keygen, rekey); an existing one is
        read with every check and re-written signed, so a legacy ledger is adopted."""
        with self._state.locked():
            if self.path.exists() or self._state.read_marker() is not None:
                opened, doc = Ledger(self.path)._load()  # unsigned legacy ledgers are adopted here
            else:
                opened, doc = {}, {}
            self._write(opened, doc)

    def reset(self, reason: str) -> dict:
        """Start a new, empty ledger after a real loss (the keys must be unlocked: a bound ledger).

        The old file (if any) is kept beside it as ``ledger.json.before-reset-TIME``; the new ledger
        refuses every bundle created before now (``not_before``); a JSON line goes to
        ``ledger-resets.log`` and a warning to the log. Returns that record."""
        if self.signer is None:
            raise KeyFileError(f"{self.path}: resetting a replay ledger needs the centre's unlocked keys")
        reason = " ".join(str(reason).split())
        if not reason:
            raise KeyFileError(f"{self.path}: a ledger reset needs a reason (--reason)")
        with self._state.locked():
            now = now_iso()
            if self.path.exists():
                try:
                    previous: object = len(self._load()[0])
                except KeyFileError as exc:
                    previous = f"unusable: {exc}"
                kept = self.path.with_name(f"{self.path.name}.before-reset-{now.replace(':', '')}")
                os.replace(self.path, kept)
            else:
                previous = "missing"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.marker)
            record = {"time": now, "reason": reason, "previous": previous, "ledger": str(self.path),
                      "centre": self.signer.centre_id, "sign_key_id": self.signer.public.sign_key_id}
            self._write({}, {"not_before": now, "resets": [{"time": now, "reason": reason}]})
            with open(self.path.with_name(RESET_LOG), "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            fsync_dir(self.path.parent)
        log.warning("replay ledger %s reset by operator (reason: %s; previous: %s); bundles created before %s "
                    "are refused", self.path, reason, previous, now)
        return record
