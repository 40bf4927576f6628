"""Centre identities: an Ed25519 signing key and an X25519 (HPKE) key per centre.

A key directory holds

- ``signing_key.pem`` Ed25519 private key, mode 0600: PEM PKCS8, or (with a passphrase) a
  ``HISTODD ENCRYPTED PRIVATE KEY`` envelope: scrypt (n = 2^17, r = 8, p = 1 by default; the
  parameters are recorded in the file) and AES-256-GCM over the PKCS8 DER
- ``kem_key.pem``     X25519 private key, same protection
- ``identity.json``   the public identity: centre id, both raw public keys (base64), key ids
  (hex SHA-256 of the raw public key, first 32 hex digits) and the creation time

``identity.json`` is what a centre hands to others (``centre-node trust add``); the private keys
never leave the directory. A private key file readable by group or others is refused
(:class:`KeyPermissionError`, naming the ``chmod 600`` to run). Passphrases come from the caller,
or from a *passphrase source* (:func:`read_passphrase`): ``env:NAME``, ``fd:N``, ``file:PATH``
or ``prompt``, so a daemon (a Flower SuperNode) can unlock its key at start without the
passphrase on its command line. Key files encrypted by the earlier writer (PKCS8 with PBKDF2,
2,048 iterations) still load, with a warning; ``centre-node rekey`` re-encrypts them.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import logging
import os
import re
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping, Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from histodd_fed.atomic import atomic_write_bytes, atomic_write_json
from histodd_fed.bundle.encoding import b64decode_exact, b64encode
from histodd_fed.bundle.errors import KeyFileError, KeyPermissionError
from histodd_fed.file_modes import refuse_shared_writable

log = logging.getLogger(__name__)

SIGNING_KEY_FILE = "signing_key.pem"
KEM_KEY_FILE = "kem_key.pem"
IDENTITY_FILE = "identity.json"
KEY_ID_HEX = 32
CENTRE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ENVELOPE_LABEL = "HISTODD ENCRYPTED PRIVATE KEY"
ENVELOPE_FORMAT = "histodd-private-key"
REPLAY_LEDGER_REQUIRED = "required"
SCRYPT_LOG2N = 17          # interactive-login cost: ~0.3 s and 128 MiB per guess on the dev VMs
SCRYPT_R, SCRYPT_P = 8, 1
SCRYPT_MAX_LOG2N, SCRYPT_MAX_R, SCRYPT_MAX_P = 22, 32, 16  # a hostile key file cannot ask for more
PassphraseSource = Union[str, Callable[[], Union[str, bytes]]]


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
    replay_ledger: bool = False   # anchored: its KEYDIR/ledger.json must exist (see bundle.ledger)

    @property
    def centre_id(self) -> str:
        return self.public.centre_id

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message)


def _raw_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _der(key) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _scrypt(passphrase: bytes, salt: bytes, log2n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=1 << log2n, r=r, p=p).derive(passphrase)


def _envelope_aad(head: dict) -> bytes:
    return json.dumps(head, sort_keys=True, separators=(",", ":")).encode("ascii")


def encrypt_key_file(key, passphrase: bytes, *, scrypt_log2n: int = SCRYPT_LOG2N, salt: bytes | None = None,
                     derived: bytes | None = None, replay_ledger: bool = True) -> bytes:
    """The passphrase-protected key file for ``key``: scrypt + AES-256-GCM over its PKCS8 DER.

    The kdf parameters, salt and key type are in the clear (and bound as AES-GCM associated data).
    ``derived``: the scrypt output for (passphrase, salt, parameters) when the caller already has it.
    ``replay_ledger``: envelope version 2 with ``"replay_ledger": "required"`` (bound like the rest:
    the anchor of the replay ledger, which cannot be edited out without the passphrase).
    """
    salt = salt or os.urandom(16)
    kind = "Ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "X25519"
    head = {"format": ENVELOPE_FORMAT, "format_version": 2 if replay_ledger else 1, "key_type": kind,
            "cipher": "AES-256-GCM", "kdf": {"name": "scrypt", "n": 1 << scrypt_log2n, "r": SCRYPT_R, "p": SCRYPT_P,
                                             "salt": base64.b64encode(salt).decode("ascii")}}
    if replay_ledger:
        head["replay_ledger"] = REPLAY_LEDGER_REQUIRED
    nonce = os.urandom(12)
    k = derived or _scrypt(passphrase, salt, scrypt_log2n, SCRYPT_R, SCRYPT_P)
    ct = AESGCM(k).encrypt(nonce, _der(key), _envelope_aad({**head, "nonce": base64.b64encode(nonce).decode()}))
    body = {**head, "nonce": base64.b64encode(nonce).decode("ascii"), "ciphertext": base64.b64encode(ct).decode("ascii")}
    return (f"-----BEGIN {ENVELOPE_LABEL}-----\n{json.dumps(body, sort_keys=True, separators=(',', ':'))}\n"
            f"-----END {ENVELOPE_LABEL}-----\n").encode("ascii")


def _parse_envelope(data: bytes, where: str) -> dict:
    try:
        lines = data.decode("ascii").strip().split("\n")
        if len(lines) != 3 or lines[0] != f"-----BEGIN {ENVELOPE_LABEL}-----" or lines[2] != f"-----END {ENVELOPE_LABEL}-----":
            raise ValueError("bad armour")
        body = json.loads(lines[1])
        kdf = body["kdf"]
        n, r, p = kdf["n"], kdf["r"], kdf["p"]
        if (body["format"] != ENVELOPE_FORMAT or body["format_version"] not in (1, 2)
                or body["cipher"] != "AES-256-GCM" or kdf["name"] != "scrypt"
                or body["key_type"] not in ("Ed25519", "X25519")
                or (body["format_version"] == 2) != (body.get("replay_ledger") == REPLAY_LEDGER_REQUIRED)):
            raise ValueError("unsupported envelope")
        if not all(type(v) is int for v in (n, r, p)) or n < 2 or n & (n - 1) or n > 1 << SCRYPT_MAX_LOG2N \
                or not 1 <= r <= SCRYPT_MAX_R or not 1 <= p <= SCRYPT_MAX_P:
            raise ValueError("scrypt parameters out of range")
        body["_salt"] = base64.b64decode(kdf["salt"], validate=True)
        body["_nonce"] = base64.b64decode(body["nonce"], validate=True)
        body["_ct"] = base64.b64decode(body["ciphertext"], validate=True)
        body["_log2n"] = n.bit_length() - 1
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise KeyFileError(f"{where}: malformed encrypted key file ({exc})") from exc
    return body


def decrypt_key_file(data: bytes, passphrase: bytes | None, where: str = "key file",
                     cache: dict | None = None):
    """Load a private key file of any format this code writes (or wrote): clear PKCS8 PEM, the
    scrypt envelope, or the earlier PBKDF2-encrypted PKCS8 PEM. Raises :class:`KeyFileError`."""
    if data.lstrip().startswith(f"-----BEGIN {ENVELOPE_LABEL}-----".encode()):
        body = _parse_envelope(data, where)
        if passphrase is None:
            raise KeyFileError(f"{where}: key is passphrase-protected; give the passphrase")
        kdf = body["kdf"]
        ck = (body["_salt"], kdf["n"], kdf["r"], kdf["p"], hashlib.sha256(passphrase).digest())
        k = cache.get(ck) if cache is not None else None
        if k is None:
            k = _scrypt(passphrase, body["_salt"], body["_log2n"], kdf["r"], kdf["p"])
        head = {x: body[x] for x in ("format", "format_version", "key_type", "cipher", "kdf", "nonce", "replay_ledger")
                if x in body}
        try:
            der = AESGCM(k).decrypt(body["_nonce"], body["_ct"], _envelope_aad(head))
        except (InvalidTag, ValueError) as exc:
            raise KeyFileError(f"{where}: cannot load key (wrong passphrase or corrupt file)") from exc
        if cache is not None:
            cache[ck] = k
        try:
            return serialization.load_der_private_key(der, password=None)
        except ValueError as exc:
            raise KeyFileError(f"{where}: encrypted key holds no valid private key") from exc
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:  # encrypted but no passphrase, or passphrase for a clear key
        msg = "key is passphrase-protected; give the passphrase" if passphrase is None else \
            "key is not encrypted; give no passphrase"
        raise KeyFileError(f"{where}: {msg}") from exc
    except ValueError as exc:
        raise KeyFileError(f"{where}: cannot load key (wrong passphrase or corrupt file)") from exc
    if passphrase is not None:
        log.warning("%s: legacy PBKDF2-encrypted key (2,048 iterations); re-encrypt it with scrypt: "
                    "centre-node rekey --keys %s", where, Path(where).parent)
    return key


def _as_bytes(passphrase: str | bytes | None) -> bytes | None:
    if passphrase is None or passphrase == "" or passphrase == b"":
        return None
    return passphrase.encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)


def check_private_file_mode(path: Path, what: str = "private key file") -> None:
    """Refuse a secret file that group or others can read or write (one line, with the chmod)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read {what} ({exc.strerror or exc})") from exc
    if st.st_mode & 0o077:
        raise KeyPermissionError(f"{path}: {what} is accessible by group/others (mode "
                                 f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}")


def _strip_newline(b: bytes) -> bytes:
    return b[:-2] if b.endswith(b"\r\n") else b[:-1] if b.endswith(b"\n") else b


def read_passphrase(source: PassphraseSource, env: Mapping[str, str] | None = None,
                    prompt: str = "Private-key passphrase: ") -> bytes:
    """Read a passphrase from a source: ``env:NAME`` (environment variable), ``fd:N`` (a file
    descriptor, read to the first newline or EOF; e.g. a pipe from the parent), ``file:PATH``
    (mode 0600 only), ``prompt`` (the terminal, not echoed), or a callable returning it."""
    if callable(source):
        pw = source()
        out = pw.encode("utf-8") if isinstance(pw, str) else bytes(pw)
    elif not isinstance(source, str) or ":" not in source and source != "prompt":
        raise KeyFileError(f"passphrase source {source!r}: expected env:NAME, fd:N, file:PATH or prompt")
    elif source == "prompt":
        out = getpass.getpass(prompt).encode("utf-8")
    else:
        kind, _, arg = source.partition(":")
        if kind == "env":
            env = os.environ if env is None else env
            if arg not in env:
                raise KeyFileError(f"passphrase source env:{arg}: environment variable is not set")
            out = env[arg].encode("utf-8")
        elif kind == "fd":
            if not arg.isdigit():
                raise KeyFileError(f"passphrase source fd:{arg}: not a file descriptor number")
            buf = b""
            try:
                while b"\n" not in buf and len(buf) < 65536:
                    piece = os.read(int(arg), 4096)
                    if not piece:
                        break
                    buf += piece
            except OSError as exc:
                raise KeyFileError(f"passphrase source fd:{arg}: cannot read ({exc.strerror or exc})") from exc
            out = buf.split(b"\n", 1)[0] if b"\n" in buf else buf
            out = _strip_newline(out + b"\n")
        elif kind == "file":
            p = Path(arg)
            check_private_file_mode(p, "passphrase file")
            try:
                out = _strip_newline(p.read_bytes())
            except OSError as exc:
                raise KeyFileError(f"{p}: cannot read passphrase file ({exc.strerror or exc})") from exc
        else:
            raise KeyFileError(f"passphrase source {source!r}: expected env:NAME, fd:N, file:PATH or prompt")
    if not out:
        raise KeyFileError(f"passphrase source {source if isinstance(source, str) else 'prompt'}: empty passphrase")
    return out


def forget_env_passphrase(source: PassphraseSource | None) -> None:
    """Remove ``NAME`` of an ``env:NAME`` source from ``os.environ`` (after the keys are unlocked)."""
    if isinstance(source, str) and source.startswith("env:"):
        os.environ.pop(source[4:], None)


def _write_private_keys(key_dir: Path, sk, kk, pw: bytes | None, scrypt_log2n: int) -> None:
    if pw is None:
        blobs = [(_pem_clear(sk)), (_pem_clear(kk))]
    else:
        salt = os.urandom(16)
        derived = _scrypt(pw, salt, scrypt_log2n, SCRYPT_R, SCRYPT_P)  # once for both files
        blobs = [encrypt_key_file(k, pw, scrypt_log2n=scrypt_log2n, salt=salt, derived=derived) for k in (sk, kk)]
    atomic_write_bytes(key_dir / SIGNING_KEY_FILE, blobs[0], mode=0o600)
    atomic_write_bytes(key_dir / KEM_KEY_FILE, blobs[1], mode=0o600)


def _anchor_replay_ledger(ident: "Identity") -> "Identity":
    """Anchor the key dir's replay ledger in the identity: ``identity.json`` says so (the sealed key
    files already do), and the ledger exists from now on (an existing one is adopted, signed)."""
    from dataclasses import replace

    from histodd_fed.bundle.ledger import Ledger

    key_dir = Path(ident.key_dir)
    atomic_write_json(key_dir / IDENTITY_FILE, {**ident.public.to_dict(), "replay_ledger": REPLAY_LEDGER_REQUIRED})
    ident = replace(ident, replay_ledger=True)
    Ledger.in_key_dir(key_dir).bound(ident).initialise()
    return ident


def _pem_clear(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def generate_identity(centre_id: str, key_dir: str | Path, passphrase: str | bytes | None = None,
                      overwrite: bool = False, *, scrypt_log2n: int = SCRYPT_LOG2N) -> Identity:
    """Create a new identity for ``centre_id`` in ``key_dir`` (keys mode 0600, identity.json).

    With a passphrase the private keys are sealed with scrypt (``n = 2**scrypt_log2n``, r = 8,
    p = 1; the parameters are recorded in the files, so tests may pass a cheaper cost).
    """
    check_centre_id(centre_id)
    if not 1 <= scrypt_log2n <= SCRYPT_MAX_LOG2N:
        raise KeyFileError(f"scrypt cost 2^{scrypt_log2n} outside 2^1..2^{SCRYPT_MAX_LOG2N}")
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
    _write_private_keys(key_dir, sk, kk, pw, scrypt_log2n)
    return _anchor_replay_ledger(Identity(public=pub, signing_key=sk, kem_private=kk, key_dir=key_dir))


def _is_encrypted(data: bytes) -> bool:
    head = data.lstrip()[:64]
    return head.startswith(f"-----BEGIN {ENVELOPE_LABEL}-----".encode()) or \
        head.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")


def _load_private(path: Path, pw: bytes | None, kind: type, cache: dict):
    """(the private key, whether its sealed envelope anchors the replay ledger)."""
    check_private_file_mode(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file ({exc.strerror or exc})") from exc
    key = decrypt_key_file(data, pw, str(path), cache)  # authenticates the envelope's fields
    if not isinstance(key, kind):
        raise KeyFileError(f"{path}: expected a {kind.__name__}, found {type(key).__name__}")
    anchored = data.lstrip().startswith(f"-----BEGIN {ENVELOPE_LABEL}-----".encode()) and \
        _parse_envelope(data, str(path))["format_version"] == 2
    return key, anchored


def _identity_json_anchors(key_dir: Path) -> bool:
    try:
        return json.loads((key_dir / IDENTITY_FILE).read_text(encoding="utf-8")).get("replay_ledger") \
            == REPLAY_LEDGER_REQUIRED
    except (OSError, ValueError, AttributeError):
        return False


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


def load_identity(key_dir: str | Path, passphrase: str | bytes | None = None, *,
                  passphrase_source: PassphraseSource | None = None,
                  env: Mapping[str, str] | None = None, consume_env: bool = True) -> Identity:
    """Load (unlock) a centre's private identity; the private keys must match ``identity.json``.

    ``passphrase``: the passphrase itself; or ``passphrase_source``: where to read it when the
    keys are encrypted: ``"env:NAME"``, ``"fd:N"``, ``"file:PATH"``, ``"prompt"`` or a callable
    (see :func:`read_passphrase`; ``env`` replaces ``os.environ`` for ``env:``). A string source
    other than ``prompt`` given for clear keys is an error (a misconfigured node); a callable or
    ``prompt`` is only asked when a key is encrypted. This is what a SuperNode calls at start, e.g.
    ``load_identity(key_dir, passphrase_source="env:HISTODD_KEY_PASSPHRASE")``.
    Key files readable by group/others, and a key folder writable by them, are refused
    (:class:`KeyPermissionError`).
    ``consume_env``: once the keys are unlocked from ``env:NAME`` of the process environment, NAME
    is removed from ``os.environ``, so no process started afterwards inherits the passphrase.
    """
    key_dir = Path(key_dir)
    if not key_dir.is_dir():
        raise KeyFileError(f"{key_dir}: no such key directory")
    refuse_shared_writable(key_dir, "key folder", KeyPermissionError)
    if passphrase is not None and passphrase_source is not None:
        raise KeyFileError(f"{key_dir}: give a passphrase or a passphrase source, not both")
    pub = load_public_identity(key_dir)
    pw = _as_bytes(passphrase)
    files = [(key_dir / SIGNING_KEY_FILE, ed25519.Ed25519PrivateKey), (key_dir / KEM_KEY_FILE, x25519.X25519PrivateKey)]
    if passphrase_source is not None:
        for f, _ in files:
            check_private_file_mode(f)
        encrypted = any(_is_encrypted(f.read_bytes()) for f, _ in files)
        lazy = callable(passphrase_source) or passphrase_source == "prompt"
        if encrypted or not lazy:
            pw = read_passphrase(passphrase_source, env, prompt=f"Passphrase for the keys in {key_dir}: ")
    cache: dict = {}
    sk, anchored_s = _load_private(files[0][0], pw, files[0][1], cache)
    kk, anchored_k = _load_private(files[1][0], pw, files[1][1], cache)
    if _raw_public(sk) != pub.sign_public or _raw_public(kk) != pub.kem_public:
        raise KeyFileError(f"{key_dir}: private keys do not match {IDENTITY_FILE}")
    if consume_env and env is None and isinstance(passphrase_source, str) and passphrase_source.startswith("env:"):
        forget_env_passphrase(passphrase_source)
    return Identity(public=pub, signing_key=sk, kem_private=kk, key_dir=key_dir,
                    replay_ledger=anchored_s or anchored_k or _identity_json_anchors(key_dir))


def rekey_identity(key_dir: str | Path, passphrase: str | bytes | None = None,
                   new_passphrase: str | bytes | None = None, *, passphrase_source: PassphraseSource | None = None,
                   scrypt_log2n: int = SCRYPT_LOG2N) -> Identity:
    """Re-encrypt a key directory's private keys (new passphrase, or legacy PBKDF2 -> scrypt).

    ``new_passphrase=None`` writes clear keys. The public identity does not change. The new key
    files anchor the replay ledger (an existing ledger is adopted and signed; none: an empty one)."""
    ident = load_identity(key_dir, passphrase, passphrase_source=passphrase_source)
    _write_private_keys(Path(key_dir), ident.signing_key, ident.kem_private, _as_bytes(new_passphrase), scrypt_log2n)
    return _anchor_replay_ledger(ident)
