"""Seal, inspect, verify and open bundles.

``seal`` encrypts a PatchSet for one or more recipient centres and signs it with the sender's
Ed25519 key. ``inspect`` reads the public header (no keys). ``verify`` checks the signature
against a trust store without decrypting: what the coordinator that relays bundles calls.
``open_bundle`` runs every check, in order, each with its own exception class (see
:mod:`histodd_fed.bundle.errors`), and writes the patch set atomically; a failed open leaves
nothing behind.

Both directions stream: sealing cuts chunks from the patch set's arrays without copying and
encrypts them into reused buffers; opening reads the file once, hashing the ciphertext for the
signature and decrypting into the final payload buffer at the same time, and acts on nothing it
decrypted until the signature is verified (``docs/bundle-format.md``, "One pass over the file").
SHA-256 runs on worker threads (hashlib releases the GIL) for payloads of ``THREAD_MIN_BYTES``
and more.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import hashlib
import hmac
import io
import json
import logging
import os
import re
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from histodd_fed import __version__
from histodd_fed.atomic import atomic_directory, atomic_write_json, atomic_writer
from histodd_fed.bundle.bounded_json import MAX_DEPTH, check_bounds, loads_bounded
from histodd_fed.bundle.errors import (DecryptionError, FormatError, KeyCommitmentError, KeyFileError,
                                       ManifestHashError, NotARecipientError, OutputExistsError, SemanticError,
                                       SignatureError, SizeLimitError, StaleBundleError, VersionError)
from histodd_fed.bundle.format import (ALGORITHMS, DEFAULT_CHUNK_SIZE, ENC_SIZE, FORMAT_VERSION, MIN_CHUNK_SIZE,
                                       READ_VERSIONS, SIGNATURE_SIZE, TAG_SIZE, BundleHeader, BundleSource, Limits,
                                       Source, canonical_json, chunk_count, encode_prefix, key_commitment,
                                       parse_created, parse_header, signed_message, wrap_info)
from histodd_fed.bundle.identity import Identity, PublicIdentity
from histodd_fed.bundle.ledger import NO_LEDGER, Ledger, _NoLedger
from histodd_fed.bundle.payload import PayloadPart, decode_payload, payload_parts
from histodd_fed.bundle.trust import TrustStore
from histodd_fed.logging_setup import progress
from histodd_fed.patchset import PatchSet
from histodd_fed.runconfig import config_hash

log = logging.getLogger(__name__)

HPKE_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
MANIFEST_AAD = b"histodd-bundle/v1/manifest\x00"
CHUNK_AAD = b"histodd-bundle/v1/chunk\x00"
MANIFEST_NONCE = b"\x00\x00\x00\x01" + bytes(8)
RECEIPT_FILE = "bundle_receipt.json"
THREAD_MIN_BYTES = 4 << 20   # payloads from this size hash on worker threads; smaller ones inline
SNAPSHOT_BYTES = 4 << 20     # open keeps the plaintext SHA-256 state about every this many bytes
PREFAULT_CHUNKS = 8          # open faults in the payload buffer this many chunks ahead, on a worker
HASH_BLOCK = 1 << 20         # the signature pass reads and hashes the file in blocks of this size
LOCAL_PATH = "<local path removed>"
_PATH_KEYS = {"synthetic_dir", "path", "paths", "dir", "out_dir", "root", "files", "cwd", "home"}
_ABS_PATH = re.compile(r"^(/|~|\\\\|[A-Za-z]:[\\/]|\.\.?/)")
MANIFEST_KEYS = {"format", "format_version", "bundle_id", "source_centre", "created", "kind", "class_names",
                 "class_counts", "num_images", "ipc", "mode", "image_shape", "distillation_config",
                 "distillation_config_sha256", "code_version", "payload_parts", "privacy_report", "extra"}
#: optional manifest fields: ``dp`` (the set's DP guarantee, from meta["dp"]) and ``release`` (per
#: recipient: the sender's release count and epsilon spent, histodd_fed.bundle.releases)
MANIFEST_OPTIONAL_KEYS = {"dp", "release"}


def chunk_nonce(index: int) -> bytes:
    return b"\x00\x00\x00\x00" + struct.pack(">Q", index)


def chunk_aad(header_sha256: bytes, index: int, last: bool) -> bytes:
    return CHUNK_AAD + header_sha256 + struct.pack(">QB", index, 1 if last else 0)


@dataclass
class OpenedBundle:
    """The result of :func:`open_bundle`."""

    patchset: PatchSet
    manifest: dict
    header: BundleHeader
    out_dir: Path | None = None


# ====================================================================== sealing
def _chunks(pieces: Iterable[memoryview], size: int) -> Iterator[memoryview]:
    """Cut a stream of byte pieces into blocks of exactly ``size`` bytes (the last one shorter).

    Blocks inside one piece are zero-copy slices of it; only a block that spans pieces is
    assembled in a staging buffer, which is reused, so the consumer must be done with a block
    before asking for the next. An empty stream gives one empty block; a stream whose length is
    a multiple of ``size`` gives no trailing empty block.
    """
    stage = memoryview(np.empty(size, dtype=np.uint8))  # no zero-fill: only written bytes are read
    fill = 0
    emitted = False
    for p in pieces:
        p = p.cast("B") if p.format != "B" or p.ndim != 1 else p
        n, pos = p.nbytes, 0
        if fill:
            take = min(size - fill, n)
            stage[fill:fill + take] = p[:take]
            fill += take
            pos = take
            if fill < size:
                continue
            emitted = True
            yield stage
            fill = 0
        while n - pos >= size:
            emitted = True
            yield p[pos:pos + size]
            pos += size
        if pos < n:
            stage[:n - pos] = p[pos:]
            fill = n - pos
    if fill or not emitted:
        yield stage[:fill]


class _Lane:
    """Runs submitted calls in submission order on one worker thread, or inline when not threaded.

    Used to overlap SHA-256 (which releases the GIL on large buffers) with AES-GCM and I/O.
    """

    def __init__(self, threaded: bool):
        self._ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bundle-hash") if threaded else None
        self._last: Future | None = None

    def submit(self, fn: Callable[..., object], *args: object) -> Future | None:
        """Queue ``fn(*args)``; returns its future (None when run inline, already done)."""
        if self._ex is None:
            fn(*args)
            return None
        self._last = self._ex.submit(fn, *args)
        return self._last

    def drain(self) -> None:
        """Wait until everything submitted so far has run (re-raising its error)."""
        if self._last is not None:
            self._last.result()

    def __enter__(self) -> "_Lane":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True)


def _wait(f: Future | None) -> None:
    if f is not None:
        f.result()


def _is_local_path(s: str) -> bool:
    if _ABS_PATH.match(s):
        return True
    if os.sep in s and len(s) < 4096:
        try:
            return os.path.exists(s)
        except (OSError, ValueError):
            return False
    return False


def strip_local_paths(obj: object) -> object:
    """A copy of ``obj`` (JSON-like) without the sender's local paths: keys that name paths are
    dropped, string values that are absolute paths (or relative paths that exist here) replaced."""
    if isinstance(obj, dict):
        return {k: strip_local_paths(v) for k, v in obj.items()
                if not (isinstance(k, str) and (k in _PATH_KEYS or k.endswith(("_dir", "_path", "_file"))))}
    if isinstance(obj, (list, tuple)):
        return [strip_local_paths(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return LOCAL_PATH
    if isinstance(obj, str) and _is_local_path(obj):
        return LOCAL_PATH
    return obj


def _manifest(ps: PatchSet, bundle_id: str, sender: Identity, created: str, parts: list[PayloadPart],
              privacy_report: dict | None, extra: dict | None, release: dict | None = None) -> dict:
    from histodd_fed.bundle.releases import dp_of
    from histodd_fed.errors import InputError

    counts = ps.class_counts()
    meta = strip_local_paths(dict(ps.meta))  # the recipients learn no local directory of the sender
    try:
        dp = dp_of(meta, f"seal bundle {bundle_id}")  # the set's DP guarantee, as sealed in the config
    except InputError as exc:
        raise FormatError(str(exc)) from exc
    privacy_report = strip_local_paths(privacy_report) if privacy_report is not None else None
    extra = strip_local_paths(extra) if extra else extra
    ipc = meta.get("ipc")
    if ipc is None and len(set(counts.values())) == 1:
        ipc = next(iter(counts.values()))
    mode = meta.get("mode") or ("per-slide" if len(ps) and int(ps.slide_index.max()) >= 0 else "patch-level")
    off = 0
    plist = []
    for p in parts:
        plist.append({"name": p.name, "format": p.format, "offset": off, "size": p.size, "sha256": p.sha256})
        off += p.size
    return {
        "format": "histodd-bundle-manifest", "format_version": 1,
        "bundle_id": bundle_id, "source_centre": sender.centre_id, "created": created,
        "kind": ps.kind, "class_names": list(ps.class_names), "class_counts": counts,
        "num_images": len(ps), "ipc": ipc, "mode": mode, "image_shape": list(ps.images.shape[1:]),
        "distillation_config": meta, "distillation_config_sha256": config_hash(meta),
        "code_version": __version__, "payload_parts": plist,
        "privacy_report": privacy_report, "extra": extra or {},
        **({"dp": dp} if dp is not None else {}), **({"release": release} if release else {}),
    }


def _sealed_header(sender: Identity, recipients: list[PublicIdentity], manifest_raw: bytes, payload_size: int,
                   bundle_id: str, created: str, chunk_size: int, version: int = FORMAT_VERSION,
                   content_keys: dict[str, bytes] | None = None) -> tuple[bytes, bytes]:
    """The canonical header bytes (one HPKE key wrap of a fresh content key per recipient) and that key.

    Version 2 adds ``key_commitment`` (HMAC-SHA256 of the content key) to the signed fields.
    ``content_keys`` (centre -> key) overrides the key wrapped for a recipient: attacker tooling only.
    """
    if version not in READ_VERSIONS:
        raise FormatError(f"bundle {bundle_id}: cannot write format version {version}")
    content_key = os.urandom(32)
    nchunks = chunk_count(payload_size, chunk_size)
    fields = {
        "format": "histodd-bundle", "bundle_id": bundle_id, "created": created,
        "source": {"centre": sender.centre_id, "sign_key_id": sender.public.sign_key_id},
        "algorithms": dict(ALGORITHMS), "chunk_size": chunk_size, "num_chunks": nchunks,
        "manifest_size": len(manifest_raw), "manifest_ciphertext_size": len(manifest_raw) + TAG_SIZE,
        "payload_size": payload_size, "payload_ciphertext_size": payload_size + TAG_SIZE * nchunks,
    }
    if version >= 2:
        fields["key_commitment"] = _b64(key_commitment(content_key, bundle_id))
    fixed = {**fields, "format_version": version}
    rlist = []
    for r in recipients:
        ck = (content_keys or {}).get(r.centre_id, content_key)
        wrapped = HPKE_SUITE.encrypt(ck, r.kem_key(), info=wrap_info(fixed, r.centre_id, r.kem_key_id))
        rlist.append({"centre": r.centre_id, "kem_key_id": r.kem_key_id,
                      "enc": _b64(wrapped[:ENC_SIZE]), "wrapped_key": _b64(wrapped[ENC_SIZE:])})
    fields["recipients"] = rlist
    return canonical_json(fields), content_key


def _write_bundle(out: BinaryIO, sender: Identity, recipients: list[PublicIdentity], manifest: dict,
                  parts: list[PayloadPart], bundle_id: str, created: str, chunk_size: int,
                  version: int = FORMAT_VERSION, content_keys: dict[str, bytes] | None = None) -> None:
    """Encrypt and sign ``manifest`` + ``parts`` into ``out`` (the low-level writer).

    Each chunk is encrypted (``encrypt_into``) into one of two reused buffers, written with one
    ``write``, and hashed for the signature on a worker thread while the next chunk is encrypted.
    """
    try:
        manifest_raw = canonical_json(manifest)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"bundle {bundle_id}: manifest is not JSON-serialisable ({exc})") from exc
    payload_size = sum(p.size for p in parts)
    nchunks = chunk_count(payload_size, chunk_size)
    header_raw, content_key = _sealed_header(sender, recipients, manifest_raw, payload_size, bundle_id, created,
                                             chunk_size, version, content_keys)
    hh = hashlib.sha256(header_raw).digest()
    aead = AESGCM(content_key)
    digest = hashlib.sha256()
    lead = (encode_prefix(header_raw, version) + header_raw
            + aead.encrypt(MANIFEST_NONCE, manifest_raw, MANIFEST_AAD + hh))
    digest.update(lead)
    out.write(lead)
    threaded = payload_size >= THREAD_MIN_BYTES
    nbuf = 2 if threaded else 1
    bufs = [memoryview(np.empty(min(chunk_size, payload_size) + TAG_SIZE, dtype=np.uint8)) for _ in range(nbuf)]
    busy: list[Future | None] = [None] * nbuf
    pieces = (piece for p in parts for piece in p.pieces())
    written = total = 0
    bar = progress(total=nchunks, desc="seal", unit="chunk", **_quiet_if_small(nchunks))
    with bar, _Lane(threaded) as hasher:
        for i, block in enumerate(_chunks(pieces, chunk_size)):
            if i >= nchunks or total + block.nbytes > payload_size:
                raise FormatError(f"bundle {bundle_id}: payload parts hold more than the {payload_size} "
                                  "bytes they declare")
            slot = i % nbuf
            _wait(busy[slot])  # the worker is done hashing what this buffer held
            ct = bufs[slot][:block.nbytes + TAG_SIZE]
            aead.encrypt_into(chunk_nonce(i), block, chunk_aad(hh, i, i == nchunks - 1), ct)
            busy[slot] = hasher.submit(digest.update, ct)
            out.write(ct)
            written += 1
            total += block.nbytes
            bar.update(1)
        hasher.drain()
    if written != nchunks or total != payload_size:
        raise FormatError(f"bundle {bundle_id}: wrote {written} chunks / {total} bytes, "
                          f"planned {nchunks} / {payload_size}")
    out.write(sender.sign(signed_message(digest.digest())))


def _quiet_if_small(n: int) -> dict:
    return {} if n > 64 else {"disable": True}


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def seal(patchset: PatchSet, sender: Identity, recipients: list[PublicIdentity], out: str | Path | None = None,
         privacy_report: dict | None = None, extra_manifest: dict | None = None, *,
         chunk_size: int = DEFAULT_CHUNK_SIZE, version: int = FORMAT_VERSION,
         release: dict | None = None, bundle_id: str | None = None) -> bytes | Path:
    """Encrypt ``patchset`` for ``recipients`` and sign it as ``sender`` (format ``version``, 2 by default).

    Local paths are removed from the manifest (``strip_local_paths``) before sealing. The set's
    ``meta["dp"]`` (epsilon, delta, accountant) is copied into the manifest's ``dp`` field;
    ``release`` (recipient -> {"count", "epsilon_total"}, from the sender's release ledger) goes to
    its ``release`` field. ``bundle_id``: 32 lowercase hex digits (default: random).

    Returns the bundle bytes, or the path ``out`` (written atomically) when given.
    """
    if not recipients:
        raise FormatError("seal: at least one recipient is needed")
    seen: set[str] = set()
    uniq = []
    for r in recipients:
        if r.kem_key_id not in seen:
            seen.add(r.kem_key_id)
            uniq.append(r)
    if not MIN_CHUNK_SIZE <= chunk_size <= Limits().max_chunk_size:
        raise FormatError(f"seal: chunk_size {chunk_size} outside {MIN_CHUNK_SIZE}..{Limits().max_chunk_size}")
    patchset.validate("seal")
    if bundle_id is None:
        bundle_id = os.urandom(16).hex()
    elif not re.fullmatch(r"[0-9a-f]{32}", bundle_id):
        raise FormatError(f"seal: bundle_id must be 32 lowercase hex digits, got {bundle_id!r}")
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for name, value in (("distillation_config", patchset.meta), ("privacy_report", privacy_report),
                        ("extra", extra_manifest)):  # what every reader refuses, before any recursive walk
        check_bounds(value, f"seal bundle {bundle_id}: manifest {name}", FormatError, max_depth=MAX_DEPTH - 1)
    parts = payload_parts(patchset)
    manifest = _manifest(patchset, bundle_id, sender, created, parts, privacy_report, extra_manifest, release)
    check_bounds(manifest, f"seal bundle {bundle_id}: manifest", FormatError)
    if out is None:
        buf = io.BytesIO()
        _write_bundle(buf, sender, uniq, manifest, parts, bundle_id, created, chunk_size, version)
        return buf.getvalue()
    out = Path(out)
    with atomic_writer(out) as fh:
        _write_bundle(fh, sender, uniq, manifest, parts, bundle_id, created, chunk_size, version)
    log.info("sealed bundle %s for %s -> %s", bundle_id, [r.centre_id for r in uniq], out)
    return out


# ====================================================================== reading
def inspect(data_or_path: Source, limits: Limits = Limits()) -> BundleHeader:
    """Parse and validate the public header and layout; needs no key, checks no signature."""
    with BundleSource(data_or_path) as src:
        return parse_header(src, limits)


@dataclass
class _Pass:
    """What one streaming pass over a bundle produced (see :func:`_stream_bundle`)."""

    digest: bytes                    # SHA-256 of every byte before the signature (header as parsed)
    manifest_ct: bytes
    payload: np.ndarray | None       # decrypted payload (uint8); None when no key was available
    bad_chunk: int | None            # first payload chunk that failed authentication
    snapshots: list[tuple[int, "hashlib._Hash"]]  # (offset, SHA-256 state of payload[:offset])


def _readinto_exact(fh: BinaryIO, buf: memoryview) -> int:
    got = 0
    while got < buf.nbytes:
        n = fh.readinto(buf[got:])
        if not n:
            break
        got += n
    return got


def _plain_step(h: "hashlib._Hash", data: memoryview, snapshots: list, end: int, snap: bool) -> None:
    h.update(data)
    if snap:
        snapshots.append((end, h.copy()))


def _hash_pass(src: BundleSource, header: BundleHeader, blob: bytes | None = None) -> bytes:
    """SHA-256 of every byte before the signature, hash only: the signature is checked on this
    before anything is unwrapped, decrypted or allocated beyond two ``HASH_BLOCK`` buffers.

    The header bytes hashed are the ones :func:`parse_header` validated (not re-read)."""
    h = hashlib.sha256(encode_prefix(header.raw, header.version) + header.raw)
    start, end = header.manifest_offset, header.signature_offset
    if blob is not None:
        h.update(memoryview(blob)[start:end])
        return h.digest()
    threaded = end - start >= THREAD_MIN_BYTES
    nbuf = 2 if threaded else 1
    bufs = [memoryview(bytearray(max(1, min(HASH_BLOCK, end - start)))) for _ in range(nbuf)]
    busy: list[Future | None] = [None] * nbuf
    src.fh.seek(start)
    pos, i = start, 0
    with _Lane(threaded) as lane:
        while pos < end:
            n = min(HASH_BLOCK, end - pos)
            slot = i % nbuf
            _wait(busy[slot])
            buf = bufs[slot][:n]
            got = _readinto_exact(src.fh, buf)
            if got != n:
                raise SizeLimitError(f"{src.name}: file ended at byte {pos + got} while hashing "
                                     "(truncated or changed while reading)")
            busy[slot] = lane.submit(h.update, buf)
            pos += n
            i += 1
        lane.drain()
    return h.digest()


def _stream_bundle(src: BundleSource, header: BundleHeader, aead: AESGCM | None, desc: str,
                   blob: bytes | None = None, hash_ct: bool = True) -> _Pass:
    """Read the bundle once: hash the ciphertext for the signature and, with a key, decrypt.

    :func:`open_bundle` calls this only after the signature over :func:`_hash_pass` verified,
    with ``hash_ct`` for a file (the digest must come out the same: the file did not change
    between the passes) and without it for an immutable ``bytes`` bundle.

    The header bytes hashed are the ones :func:`parse_header` validated (not re-read), so the
    digest, the AAD and the parsed header all describe the same bytes. Each payload chunk is read
    once into one of two reused buffers; SHA-256 of it runs on a worker thread while the main
    thread decrypts it (``decrypt_into``) straight into the payload buffer, and a second worker
    hashes the plaintext (keeping the hash state every few MiB so each manifest part's SHA-256
    can be finished after the signature is verified). A third worker faults in the fresh
    payload pages a few chunks ahead of the decryption (first-touch page faults cost as much as
    the decryption itself on the VMs measured), always finishing a range before it is decrypted. After a chunk fails authentication the
    rest is only hashed. Nothing decrypted here is parsed, returned or written by this function.
    ``blob``: the bundle itself when the caller passed an (immutable) ``bytes`` object, which is
    then sliced instead of copied into the chunk buffers.
    """
    n, cs, psize = header.num_chunks, header.chunk_size, header.fields["payload_size"]
    hh = header.header_sha256
    ct_hash = hashlib.sha256(encode_prefix(header.raw, header.version) + header.raw) if hash_ct else None
    manifest_ct = src.read_at(header.manifest_offset, header.fields["manifest_ciphertext_size"])
    if ct_hash is not None:
        ct_hash.update(manifest_ct)
    # np.empty, not bytearray(n): no zero-fill pass, and numpy asks for huge pages on large buffers
    payload = np.empty(psize, dtype=np.uint8) if aead is not None else None
    pview = memoryview(payload) if payload is not None else None
    pt_hash = hashlib.sha256()
    snapshots: list = [(0, pt_hash.copy())]
    stride = max(1, SNAPSHOT_BYTES // cs)
    threaded = psize >= THREAD_MIN_BYTES
    nbuf = 2 if threaded else 1
    bufs = [memoryview(np.empty(min(cs, psize) + TAG_SIZE, dtype=np.uint8))
            for _ in range(nbuf if blob is None else 0)]
    busy: list[Future | None] = [None] * nbuf
    bad: int | None = None
    whole = memoryview(blob) if blob is not None else None
    src.fh.seek(header.payload_offset)
    bar = progress(total=n, desc=desc, unit="chunk", **_quiet_if_small(n))
    prefault = PREFAULT_CHUNKS > 0 and threaded and payload is not None
    faulted: dict[int, Future | None] = {}  # chunk index -> its pages are being faulted in
    with bar, _Lane(threaded) as ct_lane, _Lane(threaded) as pt_lane, _Lane(prefault) as pf_lane:
        for i in range(n):
            off, length = header.chunk_span(i)
            slot = i % nbuf
            if prefault and bad is None:  # keep PREFAULT_CHUNKS chunks of the payload faulted in ahead
                for j in range(i, min(n, i + PREFAULT_CHUNKS + 1)):
                    if j not in faulted:
                        faulted[j] = pf_lane.submit(_touch_pages, payload, j * cs, min(psize, (j + 1) * cs))
                _wait(faulted.pop(i))  # never decrypt into a range the toucher may still write
            _wait(busy[slot])  # the worker is done hashing what this buffer held
            if blob is not None:
                buf = whole[off:off + length]
                got = buf.nbytes
            else:
                buf = bufs[slot][:length]
                got = _readinto_exact(src.fh, buf)
            if got != length:
                raise SizeLimitError(f"{src.name}: file ended at byte {off + got} while reading chunk {i} "
                                     "(truncated or changed while reading)")
            if ct_hash is not None:
                busy[slot] = ct_lane.submit(ct_hash.update, buf)
            if pview is not None and bad is None:
                start = i * cs
                dst = pview[start:start + length - TAG_SIZE]
                try:
                    aead.decrypt_into(chunk_nonce(i), buf, chunk_aad(hh, i, i == n - 1), dst)
                except InvalidTag:
                    bad = i
                else:
                    pt_lane.submit(_plain_step, pt_hash, dst, snapshots, start + dst.nbytes, (i + 1) % stride == 0)
            bar.update(1)
        ct_lane.drain()
        pt_lane.drain()
    return _Pass(ct_hash.digest() if ct_hash is not None else b"", manifest_ct, payload, bad, snapshots)


def _touch_pages(a: np.ndarray, start: int, end: int) -> None:
    """Fault in the pages of ``a[start:end]`` by writing a zero to each (before anything else writes there)."""
    a[start:end:4096] = 0


def _verify_signature(src: BundleSource, header: BundleHeader, signer: PublicIdentity, digest: bytes) -> None:
    sig = src.read_at(header.signature_offset, SIGNATURE_SIZE)
    try:
        signer.verify_key().verify(sig, signed_message(digest))
    except InvalidSignature as exc:
        raise SignatureError(f"{src.name}: signature does not match (bundle altered or corrupted; "
                             f"claimed signer {header.source_centre})") from exc


def verify(data_or_path: Source, trust: TrustStore, limits: Limits = Limits()) -> BundleHeader:
    """Check format, sizes, signer trust and signature; decrypts nothing (the coordinator's check)."""
    with BundleSource(data_or_path) as src:
        header = parse_header(src, limits)
        signer = trust.signer(header.source_centre, header.sign_key_id)
        digest = _hash_pass(src, header, data_or_path if type(data_or_path) is bytes else None)
        _verify_signature(src, header, signer, digest)
        return header


def _unwrap_key(header: BundleHeader, identity: Identity) -> bytes:
    mine = [r for r in header.recipients if r["kem_key_id"] == identity.public.kem_key_id]
    if not mine:
        raise NotARecipientError(f"{header.name}: not encrypted for {identity.centre_id} (key "
                                 f"{identity.public.kem_key_id}); recipients are {header.recipient_centres}")
    r = mine[0]
    if r["centre"] != identity.centre_id:
        raise NotARecipientError(f"{header.name}: recipient entry names {r['centre']!r}, not {identity.centre_id}")
    ct = base64.b64decode(r["enc"]) + base64.b64decode(r["wrapped_key"])
    try:
        key = HPKE_SUITE.decrypt(ct, identity.kem_private,
                                 info=wrap_info(header.fixed_fields(), r["centre"], r["kem_key_id"]))
    except (InvalidTag, ValueError) as exc:
        raise DecryptionError(f"{header.name}: cannot unwrap the content key for {identity.centre_id}") from exc
    if len(key) != 32:
        raise DecryptionError(f"{header.name}: content key has {len(key)} bytes, expected 32")
    return key


def _check_manifest(m: object, header: BundleHeader) -> dict:
    where = header.name
    if not isinstance(m, dict) or m.get("format") != "histodd-bundle-manifest" or m.get("format_version") != 1:
        raise SemanticError(f"{where}: manifest is not a version-1 histodd manifest")
    if not MANIFEST_KEYS <= set(m) <= MANIFEST_KEYS | MANIFEST_OPTIONAL_KEYS:
        raise SemanticError(f"{where}: manifest fields differ from version 1")
    _check_release_fields(m, where)
    if m["bundle_id"] != header.bundle_id or m["source_centre"] != header.source_centre:
        raise SemanticError(f"{where}: manifest names bundle {m['bundle_id']} from {m['source_centre']}, "
                            f"header says {header.bundle_id} from {header.source_centre}")
    cn = m["class_names"]
    if not isinstance(cn, list) or not cn or not all(isinstance(c, str) for c in cn) or len(set(cn)) != len(cn):
        raise SemanticError(f"{where}: manifest class_names must be distinct strings")
    if not isinstance(m["class_counts"], dict) or type(m["num_images"]) is not int:
        raise SemanticError(f"{where}: manifest class_counts / num_images malformed")
    if not isinstance(m["image_shape"], list) or not isinstance(m["distillation_config"], dict):
        raise SemanticError(f"{where}: manifest image_shape / distillation_config malformed")
    parts = m["payload_parts"]
    if (not isinstance(parts, list) or [p.get("name") if isinstance(p, dict) else None for p in parts]
            != ["tensors", "slides"]):
        raise SemanticError(f"{where}: manifest payload parts must be [tensors, slides]")
    off = 0
    for p in parts:
        if type(p.get("size")) is not int or p.get("offset") != off or p["size"] < 0 \
                or not isinstance(p.get("sha256"), str) or len(p["sha256"]) != 64:
            raise ManifestHashError(f"{where}: manifest part {p.get('name')} has a malformed offset/size/hash")
        off += p["size"]
    if off != header.fields["payload_size"]:
        raise ManifestHashError(f"{where}: manifest parts cover {off} bytes, payload has {header.fields['payload_size']}")
    return m


def _check_release_fields(m: dict, where: str) -> None:
    """The optional ``dp`` and ``release`` fields: well formed, and ``dp`` equal to the sealed config's."""
    import math

    if "dp" in m:
        dp = m["dp"]
        ok = isinstance(dp, dict) and set(dp) == {"epsilon", "delta", "accountant"}
        num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        if not ok or not num(dp["epsilon"]) or dp["epsilon"] < 0 or not num(dp["delta"]) \
                or not 0 <= dp["delta"] < 1 or not isinstance(dp["accountant"], str):
            raise SemanticError(f"{where}: manifest dp must be {{epsilon >= 0, delta in [0, 1), accountant}}")
        cfg_dp = m["distillation_config"].get("dp") if isinstance(m["distillation_config"], dict) else None
        if not isinstance(cfg_dp, dict) or any(cfg_dp.get(k) != dp[k] for k in dp):
            raise SemanticError(f"{where}: manifest dp differs from the sealed distillation config's dp")
    if "release" in m:
        rel = m["release"]
        if not isinstance(rel, dict) or not all(
                isinstance(k, str) and isinstance(v, dict) and set(v) == {"count", "epsilon_total"}
                and type(v["count"]) is int and v["count"] >= 0
                and isinstance(v["epsilon_total"], (int, float)) and not isinstance(v["epsilon_total"], bool)
                for k, v in rel.items()):
            raise SemanticError(f"{where}: manifest release must map centres to {{count, epsilon_total}}")


def _part_sha256(done: _Pass, start: int, end: int) -> str:
    """SHA-256 (hex) of ``payload[start:end]``; a prefix resumes from the pass's hash states."""
    view = memoryview(done.payload)
    if start != 0:
        return hashlib.sha256(view[start:end]).hexdigest()
    k = bisect.bisect_right([off for off, _ in done.snapshots], end) - 1
    off, state = done.snapshots[k]
    h = state.copy()
    h.update(view[off:end])
    return h.hexdigest()


def check_fresh(header: BundleHeader, limits: Limits, now: datetime | None = None) -> None:
    """Refuse a bundle whose signed ``created`` lies outside the freshness window
    (:class:`StaleBundleError`): older than ``limits.max_age_seconds`` or further in the future
    than ``limits.max_future_seconds``. Bounds how long a captured bundle can be replayed even
    against a ledger restored from an old backup."""
    created = parse_created(header.created)
    if created is None:  # parse_header already refused it; keep the check total
        raise FormatError(f"{header.name}: created is not an ISO-8601 time with a zone")
    now = now or datetime.now(timezone.utc)
    age = (now - created).total_seconds()
    if limits.max_age_seconds is not None and age > limits.max_age_seconds:
        raise StaleBundleError(f"{header.name}: bundle {header.bundle_id} was created {header.created}, older than "
                               f"the {limits.max_age_seconds / 86400:g}-day freshness window (replay refused; "
                               "a longer window: --max-age-days)")
    if -age > limits.max_future_seconds:
        raise StaleBundleError(f"{header.name}: bundle {header.bundle_id} claims creation at {header.created}, "
                               f"in the future by {-age:.0f} s (more than {limits.max_future_seconds} s of clock skew)")


def _check_commitment(header: BundleHeader, key: bytes, identity: Identity) -> None:
    if header.version < 2:
        return
    want = base64.b64decode(header.fields["key_commitment"])
    if not hmac.compare_digest(key_commitment(key, header.bundle_id), want):
        raise KeyCommitmentError(f"{header.name}: the content key wrapped for {identity.centre_id} is not the key "
                                 "the signed header commits to (recipients would see different contents)")


def open_bundle(data_or_path: Source, identity: Identity, trust: TrustStore, ledger: "Ledger | _NoLedger",
                out_dir: str | Path | None = None, limits: Limits = Limits()) -> OpenedBundle:
    """Verify, decrypt and check a bundle; write its patch set atomically to ``out_dir`` if given.

    ``ledger`` is required: a :class:`Ledger`, or :data:`NO_LEDGER` to opt out of replay
    protection explicitly (tests, benchmarks); ``None`` is refused (:class:`KeyFileError`).

    Checks, in order: format/version (:class:`FormatError`, :class:`VersionError`), sizes
    (:class:`SizeLimitError`), signer (:class:`UntrustedSignerError`, :class:`RevokedSignerError`),
    signature over the whole file in a hash-only pass (:class:`SignatureError`), freshness
    (:class:`StaleBundleError`), replay (:class:`ReplayError`; :class:`LedgerMissingError` when an
    initialised ledger vanished), recipient (:class:`NotARecipientError`), key unwrap and key
    commitment (:class:`DecryptionError`, :class:`KeyCommitmentError`), decryption
    (:class:`DecryptionError`), manifest hashes (:class:`ManifestHashError`), semantics
    (:class:`SemanticError`).

    Nothing is unwrapped, decrypted or allocated beyond two hash buffers before the signature is
    verified. The decrypting pass re-hashes a file and must reach the same digest (the file did
    not change between the passes); no decrypted byte is parsed or written before that.
    """
    if ledger is None or not isinstance(ledger, (Ledger, _NoLedger)):
        raise KeyFileError(f"open_bundle: a replay ledger is required, got {ledger!r} (pass a Ledger, or NO_LEDGER "
                           "to opt out explicitly)")
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None and out_dir.exists():
        raise OutputExistsError(f"{out_dir}: output already exists (choose a new directory)")
    blob = data_or_path if type(data_or_path) is bytes else None
    with BundleSource(data_or_path) as src:
        header = parse_header(src, limits)
        if header.version < 2 and len(header.recipients) > 1:
            raise VersionError(f"{header.name}: a version-1 bundle for {len(header.recipients)} recipients is not "
                               "key-committing (each could be shown different contents); ask the sender to re-seal "
                               "it (format 2)")
        signer = trust.signer(header.source_centre, header.sign_key_id)
        digest = _hash_pass(src, header, blob)
        _verify_signature(src, header, signer, digest)
        # ---- signature verified: the header and every ciphertext byte are the sender's
        check_fresh(header, limits)
        if isinstance(ledger, Ledger):
            ledger = ledger.bound(identity)  # signed; the identity's own anchored ledger must exist
            ledger.check(header.sign_key_id, header.bundle_id, where=header.name, digest=digest.hex(),
                         source=header.source_centre, created=header.created)
        key = _unwrap_key(header, identity)
        _check_commitment(header, key, identity)
        aead = AESGCM(key)
        immutable = isinstance(src.fh, io.BytesIO)  # a private copy, or the caller's immutable bytes
        done = _stream_bundle(src, header, aead, "open", blob, hash_ct=not immutable)
        if not immutable and not hmac.compare_digest(done.digest, digest):
            raise SignatureError(f"{src.name}: bundle changed between the signature check and decryption")
    try:
        mraw = aead.decrypt(MANIFEST_NONCE, done.manifest_ct, MANIFEST_AAD + header.header_sha256)
    except InvalidTag as exc:
        raise DecryptionError(f"{header.name}: manifest failed authentication") from exc
    if done.bad_chunk is not None:
        raise DecryptionError(f"{header.name}: chunk {done.bad_chunk} of {header.num_chunks} failed authentication "
                              "(reordered, truncated or altered)")
    manifest = loads_bounded(mraw, f"{header.name}: manifest", SemanticError)
    manifest = _check_manifest(manifest, header)
    for p in manifest["payload_parts"]:
        if _part_sha256(done, p["offset"], p["offset"] + p["size"]) != p["sha256"]:
            raise ManifestHashError(f"{header.name}: payload part {p['name']} does not match its manifest SHA-256")
    if config_hash(manifest["distillation_config"]) != manifest["distillation_config_sha256"]:
        raise ManifestHashError(f"{header.name}: distillation config does not match its manifest SHA-256")
    ps = decode_payload(memoryview(done.payload), manifest, header.name)
    del done
    receipt = {"header": header.summary(), "manifest": manifest, "opened_by": identity.centre_id,
               "signature": {"verified": True, "signer": header.source_centre, "sign_key_id": header.sign_key_id,
                             "digest": digest.hex()},
               "limits": limits.__dict__}
    if isinstance(ledger, Ledger):
        claim = ledger.claim(header.sign_key_id, header.bundle_id, digest.hex(),
                             {"source": header.source_centre, "created": header.created}, where=header.name)
    else:
        claim = contextlib.nullcontext()
    with claim:
        if out_dir is not None:
            with atomic_directory(out_dir, overwrite=False) as d:
                ps.save(d)
                atomic_write_json(d / RECEIPT_FILE, receipt)
    log.info("opened bundle %s from %s (%d patches)", header.bundle_id, header.source_centre, len(ps))
    return OpenedBundle(patchset=ps, manifest=manifest, header=header, out_dir=out_dir)
