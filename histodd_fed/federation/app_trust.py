"""Which Flower app code a centre runs: FAB approval, checked before anything from the FAB is used.

A SuperNode started by :mod:`histodd_fed.federation.deployment` runs with ``--isolation process``;
the centre's own launcher (``centre_node.app_guard``) starts each ClientApp process and, before
the FAB is unpacked, installed or imported, calls :func:`check_fab` with the centre's app trust
file (``app-trust.json``, kept with its keys). A FAB is approved when

- its SHA-256 (the Flower FAB hash) is listed in ``digests`` (the centre pinned that exact app), or
- it carries ``app-signature.json``: an Ed25519 signature by a key listed in ``keys`` (the
  consortium's app-release key, pinned by the centre) over :func:`app_digest` of the FAB, i.e. every
  other file's path and SHA-256. Any added, removed or changed file breaks the signature.

Approving the bytes is not enough: Flower loads the app from the folder named by the run's
``fab_id`` / ``fab_version`` / FAB ``hash_str`` (sent by the SuperLink, not read from the bytes).
:func:`check_run_binding` ties them to the approved bytes: the hash is their SHA-256, id and version
are those of the FAB's own ``pyproject.toml``, and none holds a path part (``/``, ``\\``, ``..``).

Everything here reads the FAB as a zip in memory; no file of it is written or executed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from histodd_fed.atomic import atomic_write_json
from histodd_fed.errors import ConfigError, HistoddError

SIGNATURE_FILE = "app-signature.json"
TRUST_FORMAT = "histodd-app-trust"
SIG_CONTEXT = b"histodd-fab-signature-v1\x00"
MAX_FAB_BYTES = 64 * 1024 * 1024


class UnapprovedAppError(HistoddError):
    """A Flower app (FAB) this centre has not approved: refused before any of it runs."""


def fab_sha256(fab: bytes) -> str:
    return hashlib.sha256(fab).hexdigest()


def _members(fab: bytes) -> dict[str, bytes]:
    if len(fab) > MAX_FAB_BYTES:
        raise UnapprovedAppError(f"FAB of {len(fab)} bytes exceeds {MAX_FAB_BYTES}")
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as z:
            out: dict[str, bytes] = {}
            for info in z.infolist():
                name = info.filename
                if info.is_dir():
                    continue
                if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in name.split("/")):
                    raise UnapprovedAppError(f"FAB member {name[:80]!r} has an unsafe path")
                if name in out:
                    raise UnapprovedAppError(f"FAB member {name[:80]!r} appears twice")
                if info.file_size > MAX_FAB_BYTES:
                    raise UnapprovedAppError(f"FAB member {name[:80]!r} is too large")
                out[name] = z.read(info)
            return out
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UnapprovedAppError(f"FAB is not a readable zip ({exc})") from None


def app_digest(fab: bytes) -> str:
    """SHA-256 over the sorted (path, SHA-256) of every FAB file except Flower's ``.info/`` and the signature."""
    lines = [f"{name}\x00{hashlib.sha256(data).hexdigest()}\n"
             for name, data in sorted(_members(fab).items())
             if not name.startswith(".info/") and name != SIGNATURE_FILE]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _key_id(raw: bytes) -> str:
    from histodd_fed.bundle.identity import key_id

    return key_id(raw)


@dataclass
class AppTrust:
    """A centre's approved apps: pinned FAB hashes and pinned app-release (Ed25519) public keys."""

    digests: set[str] = field(default_factory=set)
    keys: dict[str, bytes] = field(default_factory=dict)   # key id -> raw Ed25519 public key
    path: Path | None = None

    @classmethod
    def load(cls, path: str | Path) -> "AppTrust":
        """Read ``app-trust.json``; it and its folder must not be writable by group/others."""
        from histodd_fed.file_modes import refuse_shared_writable_file_and_folder

        p = Path(path)
        refuse_shared_writable_file_and_folder(p, "app trust file", ConfigError)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: unreadable app trust file ({exc})") from None
        if not isinstance(d, dict) or d.get("format") != TRUST_FORMAT:
            raise ConfigError(f"{p}: not a {TRUST_FORMAT} file")
        out = cls(path=p)
        for h in d.get("digests", []):
            if not isinstance(h, str) or len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                raise ConfigError(f"{p}: bad FAB digest {str(h)[:80]!r}")
            out.digests.add(h)
        for k in d.get("keys", []):
            try:
                raw = base64.b64decode(str(k), validate=True)
            except binascii.Error:
                raw = b""
            if len(raw) != 32:
                raise ConfigError(f"{p}: bad app key {str(k)[:80]!r} (base64 of a raw Ed25519 public key)")
            out.keys[_key_id(raw)] = raw
        if not out.digests and not out.keys:
            raise ConfigError(f"{p}: approves no app (no digests, no keys)")
        return out

    def save(self, path: str | Path | None = None) -> Path:
        p = Path(path or self.path or "app-trust.json")
        return atomic_write_json(p, {"format": TRUST_FORMAT, "format_version": 1, "digests": sorted(self.digests),
                                     "keys": [base64.b64encode(r).decode() for r in self.keys.values()]})


def check_fab(fab: bytes, trust: AppTrust) -> str:
    """Return how ``fab`` is approved; raise :class:`UnapprovedAppError` (one line) when it is not."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ed25519

    h = fab_sha256(fab)
    if h in trust.digests:
        return f"FAB {h[:16]} pinned"
    members = _members(fab)
    sig = members.get(SIGNATURE_FILE)
    if sig is None:
        raise UnapprovedAppError(f"FAB {h[:16]} is not approved by this centre (hash not pinned, no {SIGNATURE_FILE})")
    try:
        d = json.loads(sig)
        kid, digest, signature = str(d["key_id"]), str(d["app_digest"]), base64.b64decode(d["signature"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise UnapprovedAppError(f"FAB {h[:16]}: malformed {SIGNATURE_FILE}") from None
    raw = trust.keys.get(kid)
    if raw is None:
        raise UnapprovedAppError(f"FAB {h[:16]} is signed by app key {kid[:32]!r}, which this centre does not trust")
    actual = app_digest(fab)
    if actual != digest:
        raise UnapprovedAppError(f"FAB {h[:16]} does not match its signature (files added, removed or changed)")
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(raw).verify(signature, SIG_CONTEXT + bytes.fromhex(digest))
    except (InvalidSignature, ValueError):
        raise UnapprovedAppError(f"FAB {h[:16]}: bad signature by app key {kid}") from None
    return f"FAB {h[:16]} signed by app key {kid}"


def _safe_part(what: str, value: str) -> str:
    if (not value or "/" in value or "\\" in value or ".." in value or value.startswith(".")
            or any(ord(c) < 32 for c in value) or len(value) > 128):
        raise UnapprovedAppError(f"run {what} {value[:80]!r} holds a path part or is not a plain name")
    return value


def check_run_binding(fab: bytes, fab_id: str, fab_version: str, hash_str: str) -> None:
    """Refuse (:class:`UnapprovedAppError`) a run whose ``fab_id`` / ``fab_version`` / ``hash_str`` are
    not exactly those of ``fab``: Flower loads the folder they name, so they must name these bytes."""
    h = fab_sha256(fab)
    if hash_str != h:
        raise UnapprovedAppError(f"run FAB hash {str(hash_str)[:64]!r} is not the SHA-256 of the approved FAB ({h[:16]})")
    try:
        project = tomllib.loads(_members(fab)["pyproject.toml"].decode("utf-8"))
        own_id = f"{project['tool']['flwr']['app']['publisher']}/{project['project']['name']}"
        own_version = str(project["project"]["version"])
    except (KeyError, TypeError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        raise UnapprovedAppError(f"FAB {h[:16]}: no readable pyproject.toml with publisher, name and version") from None
    publisher, _, name = own_id.partition("/")
    for what, value in (("publisher", publisher), ("project name", name), ("fab_version", own_version)):
        _safe_part(what, value)
    if fab_id != own_id:
        raise UnapprovedAppError(f"run fab_id {str(fab_id)[:80]!r} is not the approved FAB's {own_id!r}")
    if fab_version != own_version:
        raise UnapprovedAppError(f"run fab_version {str(fab_version)[:80]!r} is not the approved FAB's {own_version!r}")


def approve_run(fab: bytes, trust: AppTrust, fab_id: str, fab_version: str, hash_str: str) -> str:
    """:func:`check_fab` on the bytes, then :func:`check_run_binding` on what Flower will load."""
    how = check_fab(fab, trust)
    check_run_binding(fab, fab_id, fab_version, hash_str)
    return f"{how}; run bound to {fab_id} {fab_version}"


# ---------------------------------------------------------------------------- the consortium's side
def generate_app_key(out: str | Path) -> tuple[Path, bytes]:
    """A new Ed25519 app-release key (PEM, 0600) at ``out``; returns (path, raw public key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from histodd_fed.atomic import atomic_write_bytes

    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write_bytes(Path(out), pem, mode=0o600)
    return Path(out), key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign_fab(fab: bytes, key_file: str | Path) -> dict:
    """The ``app-signature.json`` content for ``fab`` (built without that file) signed with ``key_file``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{key_file}: not an Ed25519 private key")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    digest = app_digest(fab)
    return {"format": "histodd-app-signature", "key_id": _key_id(raw), "app_digest": digest,
            "signature": base64.b64encode(key.sign(SIG_CONTEXT + bytes.fromhex(digest))).decode()}
