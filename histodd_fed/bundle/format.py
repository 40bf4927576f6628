"""The bundle container layout (version 2; version 1 is still read); see ``docs/bundle-format.md``.

::

    offset 0   magic            8 bytes  b"HDDBNDL\\x00"
           8   format version   u16 big-endian (2; 1 is still read)
          10   header length    u32 big-endian (H)
          14   header           H bytes: canonical JSON (sorted keys, no spaces, ASCII)
               manifest         manifest_ciphertext_size bytes (AES-256-GCM, one piece)
               payload          num_chunks chunks of chunk_size + 16 bytes (last one shorter)
               signature        64 bytes: Ed25519 over DOMAIN || SHA-256(all bytes before it)

This module parses and validates the fixed part (magic, version, header schema, sizes against
:class:`Limits` and the real length) without any key, and names the nonces and associated data of
the encrypted pieces. Nothing here decrypts.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Union

from histodd_fed.bundle.encoding import b64decode_exact
from histodd_fed.bundle.bounded_json import loads_bounded
from histodd_fed.bundle.errors import (FormatError, SizeLimitError, UnsupportedAlgorithmError,
                                       VersionError)

MAGIC = b"HDDBNDL\x00"
FORMAT_VERSION = 2           # written; adds ``key_commitment`` to the signed header
READ_VERSIONS = (1, 2)
PREFIX = struct.Struct(">8sHI")
PREFIX_SIZE = PREFIX.size  # 14
TAG_SIZE = 16
SIGNATURE_SIZE = 64
ENC_SIZE = 32            # X25519 HPKE encapsulated key
WRAPPED_KEY_SIZE = 32 + TAG_SIZE
MIN_CHUNK_SIZE = 64
DEFAULT_CHUNK_SIZE = 1 << 20
ALGORITHMS = {
    "signature": "Ed25519",
    "hash": "SHA-256",
    "key_wrap": "HPKE-Base(DHKEM-X25519-HKDF-SHA256,HKDF-SHA256,AES-256-GCM)",
    "content": "AES-256-GCM",
}
SIGNATURE_DOMAIN = b"histodd-bundle/v1/signature\x00"
WRAP_INFO_DOMAIN = b"histodd-bundle/v1/key-wrap\x00"
COMMIT_DOMAIN = b"histodd-bundle/v2/key-commitment\x00"
COMMIT_SIZE = 32
MANIFEST_AAD = b"histodd-bundle/v1/manifest\x00"   # AES-GCM associated data: prefix || SHA-256(header)
CHUNK_AAD = b"histodd-bundle/v1/chunk\x00"         # ... || SHA-256(header) || index u64 || last u8
MANIFEST_NONCE = b"\x00\x00\x00\x01" + bytes(8)     # the manifest's; a chunk's is chunk_nonce(index)
HEADER_KEYS_V1 = {"format", "bundle_id", "created", "source", "recipients", "algorithms", "chunk_size",
               "num_chunks", "manifest_size", "manifest_ciphertext_size", "payload_size",
               "payload_ciphertext_size"}
HEADER_KEYS = {1: HEADER_KEYS_V1, 2: HEADER_KEYS_V1 | {"key_commitment"}}
RECIPIENT_KEYS = {"centre", "kem_key_id", "enc", "wrapped_key"}
HEX32 = re.compile(r"^[0-9a-f]{32}$")
CENTRE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CREATED = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})$")

Source = Union[bytes, bytearray, memoryview, str, os.PathLike]


@dataclass(frozen=True)
class Limits:
    """Upper bounds a receiver accepts before reading further (hostile-input guard)."""

    max_header_bytes: int = 64 * 1024
    max_recipients: int = 64
    max_manifest_bytes: int = 4 * 1024 * 1024
    max_payload_bytes: int = 16 * 1024 ** 3
    max_chunk_size: int = 64 * 1024 * 1024
    max_chunks: int = 1 << 20
    max_age_seconds: int | None = 30 * 86400   # freshness window on the signed ``created`` (None: off)
    max_future_seconds: int = 600               # clock skew tolerated for a ``created`` ahead of ours


def canonical_json(obj: object) -> bytes:
    """The one byte encoding of a JSON value used for headers and manifests."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def parse_created(value: object) -> datetime | None:
    """The header's ``created`` as an aware datetime, or None unless strict ISO-8601 with a zone."""
    if not isinstance(value, str) or not CREATED.match(value):
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else None


def key_commitment(content_key: bytes, bundle_id: str) -> bytes:
    """Version-2 key commitment: HMAC-SHA256(content key, domain || bundle id), signed in the header."""
    import hmac

    return hmac.new(content_key, COMMIT_DOMAIN + bundle_id.encode("ascii"), hashlib.sha256).digest()


def chunk_count(payload_size: int, chunk_size: int) -> int:
    """Number of payload chunks: at least one (an empty payload is one empty chunk)."""
    return max(1, math.ceil(payload_size / chunk_size))


def chunk_nonce(index: int) -> bytes:
    return b"\x00\x00\x00\x00" + struct.pack(">Q", index)


def chunk_aad(header_sha256: bytes, index: int, last: bool) -> bytes:
    return CHUNK_AAD + header_sha256 + struct.pack(">QB", index, 1 if last else 0)


@dataclass(frozen=True)
class BundleHeader:
    """The parsed, validated public header of a bundle and where its parts lie in the file."""

    fields: dict
    raw: bytes
    version: int
    file_size: int
    name: str = "bundle"

    # -- fields
    @property
    def bundle_id(self) -> str:
        return self.fields["bundle_id"]

    @property
    def created(self) -> str:
        return self.fields["created"]

    @property
    def source_centre(self) -> str:
        return self.fields["source"]["centre"]

    @property
    def sign_key_id(self) -> str:
        return self.fields["source"]["sign_key_id"]

    @property
    def sender(self) -> str:
        """Alias of :attr:`source_centre`."""
        return self.source_centre

    @property
    def recipients(self) -> list[dict]:
        """Copies of the recipient entries, each also carrying ``centre_id`` (= ``centre``)."""
        return [{**r, "centre_id": r["centre"]} for r in self.fields["recipients"]]

    @property
    def recipient_centres(self) -> list[str]:
        return [r["centre"] for r in self.recipients]

    @property
    def chunk_size(self) -> int:
        return self.fields["chunk_size"]

    @property
    def num_chunks(self) -> int:
        return self.fields["num_chunks"]

    @property
    def header_sha256(self) -> bytes:
        return hashlib.sha256(self.raw).digest()

    # -- layout
    @property
    def manifest_offset(self) -> int:
        return PREFIX_SIZE + len(self.raw)

    @property
    def payload_offset(self) -> int:
        return self.manifest_offset + self.fields["manifest_ciphertext_size"]

    @property
    def signature_offset(self) -> int:
        return self.payload_offset + self.fields["payload_ciphertext_size"]

    def chunk_span(self, index: int) -> tuple[int, int]:
        """(offset, ciphertext length) of payload chunk ``index``."""
        start = self.payload_offset + index * (self.chunk_size + TAG_SIZE)
        if index < self.num_chunks - 1:
            return start, self.chunk_size + TAG_SIZE
        last_plain = self.fields["payload_size"] - (self.num_chunks - 1) * self.chunk_size
        return start, last_plain + TAG_SIZE

    def fixed_fields(self) -> dict:
        """Everything but the recipients list: what each key wrap's HPKE ``info`` binds."""
        d = {k: v for k, v in self.fields.items() if k != "recipients"}
        d["format_version"] = self.version
        return d

    def summary(self) -> dict:
        f = self.fields
        return {
            "file": self.name, "format_version": self.version, "bundle_id": self.bundle_id,
            "created": self.created, "source_centre": self.source_centre, "sign_key_id": self.sign_key_id,
            "recipients": [{"centre": r["centre"], "kem_key_id": r["kem_key_id"]} for r in self.recipients],
            "algorithms": f["algorithms"], "chunk_size": self.chunk_size, "num_chunks": self.num_chunks,
            "payload_size": f["payload_size"], "file_size": self.file_size,
        }


def wrap_info(fixed_fields: dict, centre: str, kem_key_id: str) -> bytes:
    """HPKE ``info`` for one recipient: domain, header fixed fields, the recipient's names."""
    return WRAP_INFO_DOMAIN + canonical_json({"header": fixed_fields, "recipient": {
        "centre": centre, "kem_key_id": kem_key_id}})


def signed_message(digest: bytes) -> bytes:
    return SIGNATURE_DOMAIN + digest


# ---------------------------------------------------------------------- sources
class BundleSource:
    """Random access to bundle bytes, from memory or from a file (never read whole)."""

    def __init__(self, data_or_path: Source):
        self._own = False
        if isinstance(data_or_path, (bytes, bytearray, memoryview)):
            self.name = "<bundle bytes>"
            self.fh: BinaryIO = io.BytesIO(bytes(data_or_path) if not isinstance(data_or_path, bytes) else data_or_path)
            self.size = len(data_or_path) if not isinstance(data_or_path, memoryview) else data_or_path.nbytes
        elif isinstance(data_or_path, (str, os.PathLike)):
            p = Path(data_or_path)
            self.name = str(p)
            try:  # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat decides before any read
                fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            except OSError as exc:
                raise FormatError(f"{p}: cannot open bundle ({exc.strerror or exc})") from exc
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise FormatError(f"{p}: not a regular file (refusing a FIFO, device, socket or directory)")
            os.set_blocking(fd, True)
            self.fh = os.fdopen(fd, "rb")
            self._own = True
            self.size = st.st_size
        else:
            raise FormatError(f"bundle: expected bytes or a path, got {type(data_or_path).__name__}")

    def read_at(self, offset: int, n: int) -> bytes:
        self.fh.seek(offset)
        b = self.fh.read(n)
        if len(b) != n:
            raise SizeLimitError(f"{self.name}: file ended at byte {offset + len(b)} while reading "
                                 f"{n} bytes at {offset} (truncated or changed while reading)")
        return b

    def hash_range(self, start: int, end: int, block: int = 1 << 20) -> bytes:
        h = hashlib.sha256()
        pos = start
        while pos < end:
            b = self.read_at(pos, min(block, end - pos))
            h.update(b)
            pos += len(b)
        return h.digest()

    def close(self) -> None:
        if self._own:
            self.fh.close()

    def __enter__(self) -> "BundleSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------- parsing
def _b64(s: object, n: int, where: str) -> bytes:
    return b64decode_exact(s, n, where, FormatError)


def _int(d: dict, key: str, where: str) -> int:
    v = d[key]
    if type(v) is not int or v < 0:
        raise FormatError(f"{where}: header field {key} must be a non-negative integer")
    return v


def parse_header(src: BundleSource, limits: Limits = Limits()) -> BundleHeader:
    """Check magic, version, header schema and declared sizes; return the header."""
    where = src.name
    if src.size < PREFIX_SIZE:
        raise FormatError(f"{where}: {src.size} bytes is too short to be a bundle")
    magic, version, hlen = PREFIX.unpack(src.read_at(0, PREFIX_SIZE))
    if magic != MAGIC:
        raise FormatError(f"{where}: not a histodd bundle (bad magic)")
    if version not in READ_VERSIONS:
        raise VersionError(f"{where}: bundle format version {version} is not supported (this reads "
                           f"{', '.join(map(str, READ_VERSIONS))})")
    if hlen > limits.max_header_bytes:
        raise SizeLimitError(f"{where}: header of {hlen} bytes exceeds the limit of {limits.max_header_bytes}")
    if PREFIX_SIZE + hlen + SIGNATURE_SIZE > src.size:
        raise SizeLimitError(f"{where}: header declares {hlen} bytes but the file has only {src.size} (truncated)")
    raw = src.read_at(PREFIX_SIZE, hlen)
    try:
        raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{where}: header is not ASCII") from exc
    fields = loads_bounded(raw, f"{where}: header", FormatError)
    if not isinstance(fields, dict):
        raise FormatError(f"{where}: header is not a JSON object")
    try:
        canon = canonical_json(fields)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{where}: header holds non-JSON numbers") from exc
    if canon != raw:
        raise FormatError(f"{where}: header is not in canonical form")
    keys = HEADER_KEYS[version]
    if set(fields) != keys:
        extra, missing = sorted(set(fields) - keys), sorted(keys - set(fields))
        raise FormatError(f"{where}: header fields differ from version {version} (unexpected {extra}, "
                          f"missing {missing})")
    if fields["format"] != "histodd-bundle":
        raise FormatError(f"{where}: header format is {fields['format']!r}, not 'histodd-bundle'")
    if fields["algorithms"] != ALGORITHMS:
        raise UnsupportedAlgorithmError(f"{where}: header names algorithms {fields['algorithms']!r}; "
                                        f"version {version} allows only {ALGORITHMS!r}")
    if not isinstance(fields["bundle_id"], str) or not HEX32.match(fields["bundle_id"]):
        raise FormatError(f"{where}: bundle_id must be 32 lowercase hex digits")
    if parse_created(fields["created"]) is None:
        raise FormatError(f"{where}: created {ascii(fields['created'])[:80]} is not an ISO-8601 time with a zone")
    if version >= 2:
        _b64(fields["key_commitment"], COMMIT_SIZE, f"{where}: key_commitment")
    src_f = fields["source"]
    if (not isinstance(src_f, dict) or set(src_f) != {"centre", "sign_key_id"}
            or not isinstance(src_f["centre"], str) or not CENTRE.match(src_f["centre"])
            or not isinstance(src_f["sign_key_id"], str) or not HEX32.match(src_f["sign_key_id"])):
        raise FormatError(f"{where}: malformed source (centre, sign_key_id)")
    recips = fields["recipients"]
    if not isinstance(recips, list) or not recips:
        raise FormatError(f"{where}: recipients must be a non-empty list")
    if len(recips) > limits.max_recipients:
        raise SizeLimitError(f"{where}: {len(recips)} recipients exceed the limit of {limits.max_recipients}")
    for i, r in enumerate(recips):
        rw = f"{where}: recipient {i}"
        if not isinstance(r, dict) or set(r) != RECIPIENT_KEYS:
            raise FormatError(f"{rw}: fields must be {sorted(RECIPIENT_KEYS)}")
        if not isinstance(r["centre"], str) or not CENTRE.match(r["centre"]):
            raise FormatError(f"{rw}: invalid centre id")
        if not isinstance(r["kem_key_id"], str) or not HEX32.match(r["kem_key_id"]):
            raise FormatError(f"{rw}: kem_key_id must be 32 hex digits")
        _b64(r["enc"], ENC_SIZE, f"{rw} enc")
        _b64(r["wrapped_key"], WRAPPED_KEY_SIZE, f"{rw} wrapped_key")
    if len({r["kem_key_id"] for r in recips}) != len(recips):
        raise FormatError(f"{where}: a recipient key appears twice")
    chunk = _int(fields, "chunk_size", where)
    nchunks = _int(fields, "num_chunks", where)
    msize = _int(fields, "manifest_size", where)
    mct = _int(fields, "manifest_ciphertext_size", where)
    psize = _int(fields, "payload_size", where)
    pct = _int(fields, "payload_ciphertext_size", where)
    if chunk < MIN_CHUNK_SIZE:
        raise FormatError(f"{where}: chunk_size {chunk} below the minimum {MIN_CHUNK_SIZE}")
    if chunk > limits.max_chunk_size:
        raise SizeLimitError(f"{where}: chunk_size {chunk} exceeds the limit of {limits.max_chunk_size}")
    if nchunks > limits.max_chunks:
        raise SizeLimitError(f"{where}: {nchunks} chunks exceed the limit of {limits.max_chunks}")
    if msize > limits.max_manifest_bytes:
        raise SizeLimitError(f"{where}: manifest of {msize} bytes exceeds the limit of {limits.max_manifest_bytes}")
    if psize > limits.max_payload_bytes:
        raise SizeLimitError(f"{where}: payload of {psize} bytes exceeds the limit of {limits.max_payload_bytes}")
    if mct != msize + TAG_SIZE:
        raise FormatError(f"{where}: manifest_ciphertext_size {mct} != manifest_size + {TAG_SIZE}")
    if nchunks != chunk_count(psize, chunk):
        raise FormatError(f"{where}: num_chunks {nchunks} does not fit payload_size {psize} / chunk_size {chunk}")
    if pct != psize + TAG_SIZE * nchunks:
        raise FormatError(f"{where}: payload_ciphertext_size {pct} != payload_size + {TAG_SIZE} per chunk")
    expected = PREFIX_SIZE + hlen + mct + pct + SIGNATURE_SIZE
    if expected != src.size:
        what = "truncated" if src.size < expected else "trailing data"
        raise SizeLimitError(f"{where}: header declares {expected} bytes but the file has {src.size} ({what})")
    return BundleHeader(fields=fields, raw=raw, version=version, file_size=src.size, name=where)


def encode_prefix(header_raw: bytes, version: int = FORMAT_VERSION) -> bytes:
    return PREFIX.pack(MAGIC, version, len(header_raw))


__all__ = ["ALGORITHMS", "BundleHeader", "BundleSource", "DEFAULT_CHUNK_SIZE", "FORMAT_VERSION", "Limits",
           "READ_VERSIONS", "key_commitment", "parse_created",
           "MAGIC", "canonical_json", "chunk_count", "encode_prefix", "parse_header", "signed_message",
           "wrap_info"]
