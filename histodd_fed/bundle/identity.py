"""Centre identities: an Ed25519 signing key and an X25519 (HPKE) key per centre.

A key directory holds

- ``signing_key.pem`` Ed25519 private key, PEM PKCS8, mode 0600, optionally passphrase-encrypted
- ``kem_key.pem``     X25519 private key, PEM PKCS8, mode 0600, optionally passphrase-encrypted
- ``identity.json``   the public identity: centre id, both raw public keys (base64), key ids
  (hex SHA-256 of the raw public key, first 32 hex digits) and the creation time

``identity.json`` is what a centre hands to others (``centre-node trust add``); the private keys
never leave the directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from histodd_fed.atomic import atomic_write_bytes, atomic_write_json
from histodd_fed.bundle.encoding import b64decode_exact, b64encode
from histodd_fed.bundle.errors import KeyFileError

SIGNING_KEY_FILE = "signing_key.pem"
KEM_KEY_FILE = "kem_key.pem"
IDENTITY_FILE = "identity.json"
KEY_ID_HEX = 32
CENTRE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def key_id(raw_public_key: bytes) -> str:
    """Key id: hex SHA-256 of the raw public key, first 32 hex digits (128 bits)."""
    return hashlib.sha256(raw_public_key).hexdigest()[:KEY_ID_HEX]


def check_centre_id(centre_id: str, where: str = "centre id") -> str:
    if not isinstance(centre_id, str) or not CENTRE_ID_RE.match(centre_id):
        raise KeyFileError(f"{where}: invalid centre id {centre_id!r} (letters, digits, . _ -; at most 64)")
    return centre_id


def _b64(b: bytes) -> str:
    return b64encode(b)


def _unb64(s: object, n: int, where: str) -> bytes:
    return b64decode_exact(s, n, where, KeyFileError)


@dataclass(frozen=True)
class PublicIdentity:
    """What others know of a centre: its id and two public keys."""

    centre_id: str
    sign_public: bytes
    kem_public: bytes
    created: str = ""

    @property
    def sign_key_id(self) -> str:
        return key_id(self.sign_public)

    @property
    def kem_key_id(self) -> str:
        return key_id(self.kem_public)

    def verify_key(self) -> ed25519.Ed25519PublicKey:
        return ed25519.Ed25519PublicKey.from_public_bytes(self.sign_public)

    def kem_key(self) -> x25519.X25519PublicKey:
        return x25519.X25519PublicKey.from_public_bytes(self.kem_public)

    def to_dict(self) -> dict:
        return {
            "format": "histodd-identity",
            "format_version": 1,
            "centre_id": self.centre_id,
            "sign_public": _b64(self.sign_public),
            "sign_key_id": self.sign_key_id,
            "kem_public": _b64(self.kem_public),
            "kem_key_id": self.kem_key_id,
            "algorithms": {"sign": "Ed25519", "kem": "X25519"},
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, d: object, where: str = "identity") -> "PublicIdentity":
        if not isinstance(d, dict) or d.get("format") != "histodd-identity":
            raise KeyFileError(f"{where}: not a histodd identity")
        if d.get("format_version") != 1:
            raise KeyFileError(f"{where}: unsupported identity version {d.get('format_version')!r}")
        pub = cls(
            centre_id=check_centre_id(d.get("centre_id"), where),
            sign_public=_unb64(d.get("sign_public"), 32, f"{where}: sign_public"),
            kem_public=_unb64(d.get("kem_public"), 32, f"{where}: kem_public"),
            created=str(d.get("created", "")),
        )
        for name in ("sign_key_id", "kem_key_id"):
            if name in d and d[name] != getattr(pub, name):
                raise KeyFileError(f"{where}: {name} {d[name]!r} does not match its public key")
        try:  # both must be valid curve points / encodings
            pub.verify_key()
            pub.kem_key()
        except ValueError as exc:
            raise KeyFileError(f"{where}: invalid public key ({exc})") from exc
        return pub


@dataclass(frozen=True)
class Identity:
    """A centre's own identity, with its private keys (loaded from its key directory)."""

    public: PublicIdentity
    signing_key: ed25519.Ed25519PrivateKey
    kem_private: x25519.X25519PrivateKey
    key_dir: Path | None = None

    @property
    def centre_id(self) -> str:
        return self.public.centre_id

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message)


def _raw_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _pem(key, passphrase: bytes | None) -> bytes:
    enc = (serialization.BestAvailableEncryption(passphrase) if passphrase
           else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def _as_bytes(passphrase: str | bytes | None) -> bytes | None:
    if passphrase is None or passphrase == "" or passphrase == b"":
        return None
    return passphrase.encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)


def generate_identity(centre_id: str, key_dir: str | Path, passphrase: str | bytes | None = None,
                      overwrite: bool = False) -> Identity:
    """Create a new identity for ``centre_id`` in ``key_dir`` (keys mode 0600, identity.json)."""
    check_centre_id(centre_id)
    key_dir = Path(key_dir)
    if not overwrite and any((key_dir / f).exists() for f in (SIGNING_KEY_FILE, KEM_KEY_FILE, IDENTITY_FILE)):
        raise KeyFileError(f"{key_dir}: already holds an identity (refusing to overwrite keys)")
    key_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(key_dir, 0o700)
    pw = _as_bytes(passphrase)
    sk = ed25519.Ed25519PrivateKey.generate()
    kk = x25519.X25519PrivateKey.generate()
    pub = PublicIdentity(centre_id=centre_id, sign_public=_raw_public(sk), kem_public=_raw_public(kk),
                         created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    atomic_write_bytes(key_dir / SIGNING_KEY_FILE, _pem(sk, pw), mode=0o600)
    atomic_write_bytes(key_dir / KEM_KEY_FILE, _pem(kk, pw), mode=0o600)
    atomic_write_json(key_dir / IDENTITY_FILE, pub.to_dict())
    return Identity(public=pub, signing_key=sk, kem_private=kk, key_dir=key_dir)


def _load_private(path: Path, pw: bytes | None, kind: type):
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file ({exc.strerror or exc})") from exc
    try:
        key = serialization.load_pem_private_key(data, password=pw)
    except TypeError as exc:  # encrypted but no passphrase, or passphrase for a clear key
        msg = "key is passphrase-protected; give the passphrase" if pw is None else "key is not encrypted; give no passphrase"
        raise KeyFileError(f"{path}: {msg}") from exc
    except ValueError as exc:
        raise KeyFileError(f"{path}: cannot load key (wrong passphrase or corrupt file)") from exc
    if not isinstance(key, kind):
        raise KeyFileError(f"{path}: expected a {kind.__name__}, found {type(key).__name__}")
    return key


def load_public_identity(path: str | Path) -> PublicIdentity:
    """Load ``identity.json`` (given directly, or the one inside a key directory)."""
    path = Path(path)
    f = path / IDENTITY_FILE if path.is_dir() else path
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KeyFileError(f"{f}: cannot read identity ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{f}: identity is not valid JSON ({exc})") from exc
    return PublicIdentity.from_dict(d, where=str(f))


def load_identity(key_dir: str | Path, passphrase: str | bytes | None = None) -> Identity:
    """Load a centre's private identity; the private keys must match ``identity.json``."""
    key_dir = Path(key_dir)
    if not key_dir.is_dir():
        raise KeyFileError(f"{key_dir}: no such key directory")
    pub = load_public_identity(key_dir)
    pw = _as_bytes(passphrase)
    sk = _load_private(key_dir / SIGNING_KEY_FILE, pw, ed25519.Ed25519PrivateKey)
    kk = _load_private(key_dir / KEM_KEY_FILE, pw, x25519.X25519PrivateKey)
    if _raw_public(sk) != pub.sign_public or _raw_public(kk) != pub.kem_public:
        raise KeyFileError(f"{key_dir}: private keys do not match {IDENTITY_FILE}")
    return Identity(public=pub, signing_key=sk, kem_private=kk, key_dir=key_dir)
