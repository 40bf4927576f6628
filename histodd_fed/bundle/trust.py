"""The trust store: which centres' public keys this node accepts (``trust.json`` in a key dir).

Keys are pinned by key id: adding a different key for a centre already present fails unless
``replace=True`` (then the old keys are revoked). Removing a centre revokes its keys: a bundle
signed by a revoked key is rejected as :class:`RevokedSignerError`, not as merely unknown.
A revoked key can never be trusted again (generate a new key instead).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from histodd_fed.atomic import atomic_write_json
from histodd_fed.bundle.errors import (KeyFileError, KeyPermissionError, RevokedSignerError, TrustConflictError,
                                       UntrustedSignerError)
from histodd_fed.bundle.identity import PublicIdentity
from histodd_fed.file_modes import refuse_shared_writable_file_and_folder

TRUST_FILE = "trust.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class TrustStore:
    """Trusted public identities by centre id, plus revoked key ids."""

    path: Path | None = None
    centres: dict[str, PublicIdentity] = field(default_factory=dict)
    added: dict[str, str] = field(default_factory=dict)
    revoked: list[dict] = field(default_factory=list)

    # ------------------------------------------------------------------ io
    @classmethod
    def load(cls, key_dir_or_file: str | Path) -> "TrustStore":
        """Load ``trust.json`` from a key dir (or the file itself); a missing file is an empty store.

        The file and its folder must not be writable by group/others (:class:`KeyPermissionError`)."""
        p = Path(key_dir_or_file)
        f = p / TRUST_FILE if p.is_dir() or p.suffix != ".json" else p
        refuse_shared_writable_file_and_folder(f, "trust store", KeyPermissionError)
        store = cls(path=f)
        if not f.exists():
            return store
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"{f}: unreadable trust store ({exc})") from exc
        if not isinstance(d, dict) or d.get("format") != "histodd-trust" or d.get("format_version") != 1:
            raise KeyFileError(f"{f}: not a histodd trust store (version 1)")
        centres = d.get("centres", {})
        revoked = d.get("revoked", [])
        if not isinstance(centres, dict) or not isinstance(revoked, list):
            raise KeyFileError(f"{f}: malformed trust store")
        for cid, entry in centres.items():
            pub = PublicIdentity.from_dict(entry.get("identity") if isinstance(entry, dict) else None,
                                           where=f"{f}: centre {cid}")
            if pub.centre_id != cid:
                raise KeyFileError(f"{f}: entry {cid!r} holds the identity of {pub.centre_id!r}")
            store.centres[cid] = pub
            store.added[cid] = str(entry.get("added", ""))
        for r in revoked:
            if not isinstance(r, dict) or not isinstance(r.get("sign_key_id"), str):
                raise KeyFileError(f"{f}: malformed revoked entry {r!r}")
            store.revoked.append(dict(r))
        return store

    def save(self) -> Path:
        if self.path is None:
            raise KeyFileError("trust store: no path to save to")
        d = {
            "format": "histodd-trust",
            "format_version": 1,
            "centres": {cid: {"identity": pub.to_dict(), "added": self.added.get(cid, "")}
                        for cid, pub in sorted(self.centres.items())},
            "revoked": self.revoked,
        }
        return atomic_write_json(self.path, d)

    # ------------------------------------------------------------------ edits
    def revoked_key_ids(self) -> set[str]:
        ids: set[str] = set()
        for r in self.revoked:
            ids.add(r["sign_key_id"])
            if isinstance(r.get("kem_key_id"), str):
                ids.add(r["kem_key_id"])
        return ids

    def add(self, pub: PublicIdentity, replace: bool = False) -> bool:
        """Trust ``pub``. Returns False if the same keys were already trusted."""
        bad = self.revoked_key_ids() & {pub.sign_key_id, pub.kem_key_id}
        if bad:
            raise RevokedSignerError(f"{self._where()}: key {sorted(bad)[0]} of {pub.centre_id} was revoked; "
                                     "it cannot be trusted again")
        old = self.centres.get(pub.centre_id)
        if old is not None:
            if old.sign_public == pub.sign_public and old.kem_public == pub.kem_public:
                return False
            if not replace:
                raise TrustConflictError(
                    f"{self._where()}: centre {pub.centre_id} is pinned to key {old.sign_key_id}, "
                    f"not {pub.sign_key_id} (use --replace to rotate; the old key is then revoked)")
            self._revoke(old, reason="replaced")
        self.centres[pub.centre_id] = pub
        self.added[pub.centre_id] = _now()
        return True

    def remove(self, centre_id: str) -> PublicIdentity:
        """Stop trusting ``centre_id`` and revoke its keys."""
        pub = self.centres.pop(centre_id, None)
        if pub is None:
            raise KeyFileError(f"{self._where()}: centre {centre_id!r} is not in the trust store")
        self.added.pop(centre_id, None)
        self._revoke(pub, reason="removed")
        return pub

    def _revoke(self, pub: PublicIdentity, reason: str) -> None:
        self.revoked.append({"centre_id": pub.centre_id, "sign_key_id": pub.sign_key_id,
                             "kem_key_id": pub.kem_key_id, "revoked": _now(), "reason": reason})

    def _where(self) -> str:
        return str(self.path) if self.path else "trust store"

    # ------------------------------------------------------------------ lookups
    def signer(self, centre_id: str, sign_key_id: str) -> PublicIdentity:
        """The trusted identity that may sign as ``centre_id`` with ``sign_key_id``."""
        if sign_key_id in self.revoked_key_ids():
            raise RevokedSignerError(f"signer {centre_id} key {sign_key_id} was revoked in {self._where()}")
        pub = self.centres.get(centre_id)
        if pub is None:
            raise UntrustedSignerError(f"signer {centre_id!r} is not in the trust store {self._where()}")
        if pub.sign_key_id != sign_key_id:
            raise UntrustedSignerError(f"signer {centre_id} key {sign_key_id} is not the pinned key "
                                       f"{pub.sign_key_id} in {self._where()}")
        return pub

    def recipients(self, centre_ids: list[str]) -> list[PublicIdentity]:
        out = []
        for cid in centre_ids:
            if cid not in self.centres:
                raise UntrustedSignerError(f"recipient {cid!r} is not in the trust store {self._where()} "
                                           "(add its identity.json with `centre-node trust add`)")
            out.append(self.centres[cid])
        return out

    def __contains__(self, centre_id: object) -> bool:
        return centre_id in self.centres
