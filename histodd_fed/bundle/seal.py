"""Seal, inspect, verify and open bundles.

``seal`` encrypts a PatchSet for one or more recipient centres and signs it with the sender's
Ed25519 key. ``inspect`` reads the public header (no keys). ``verify`` checks the signature
against a trust store without decrypting: what the coordinator that relays bundles calls.
``open_bundle`` runs every check, in order, each with its own exception class (see
:mod:`histodd_fed.bundle.errors`), and writes the patch set atomically; a failed open leaves
nothing behind.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from histodd_fed import __version__
from histodd_fed.atomic import atomic_directory, atomic_write_json, atomic_writer
from histodd_fed.bundle.errors import (DecryptionError, FormatError, ManifestHashError, NotARecipientError,
                                       OutputExistsError, SemanticError, SignatureError)
from histodd_fed.bundle.format import (ALGORITHMS, DEFAULT_CHUNK_SIZE, ENC_SIZE, MIN_CHUNK_SIZE,
                                       SIGNATURE_SIZE, TAG_SIZE, BundleHeader, BundleSource, Limits, Source,
                                       canonical_json, chunk_count, encode_prefix, parse_header,
                                       signed_message, wrap_info)
from histodd_fed.bundle.identity import Identity, PublicIdentity
from histodd_fed.bundle.ledger import Ledger
from histodd_fed.bundle.payload import PayloadPart, payload_parts, read_payload
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
MANIFEST_KEYS = {"format", "format_version", "bundle_id", "source_centre", "created", "kind", "class_names",
                 "class_counts", "num_images", "ipc", "mode", "image_shape", "distillation_config",
                 "distillation_config_sha256", "code_version", "payload_parts", "privacy_report", "extra"}


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
def _rechunk(pieces: Iterable[memoryview], size: int) -> Iterator[bytes]:
    """Regroup a stream of byte pieces into blocks of exactly ``size`` (the last may be shorter)."""
    buf = bytearray()
    for p in pieces:
        buf += p
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    yield bytes(buf)


def _manifest(ps: PatchSet, bundle_id: str, sender: Identity, created: str, parts: list[PayloadPart],
              privacy_report: dict | None, extra: dict | None) -> dict:
    counts = ps.class_counts()
    meta = dict(ps.meta)
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
    }


def _write_bundle(out: BinaryIO, sender: Identity, recipients: list[PublicIdentity], manifest: dict,
                  parts: list[PayloadPart], bundle_id: str, created: str, chunk_size: int) -> None:
    """Encrypt and sign ``manifest`` + ``parts`` into ``out`` (the low-level writer)."""
    try:
        manifest_raw = canonical_json(manifest)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"bundle {bundle_id}: manifest is not JSON-serialisable ({exc})") from exc
    payload_size = sum(p.size for p in parts)
    nchunks = chunk_count(payload_size, chunk_size)
    fields = {
        "format": "histodd-bundle", "bundle_id": bundle_id, "created": created,
        "source": {"centre": sender.centre_id, "sign_key_id": sender.public.sign_key_id},
        "algorithms": dict(ALGORITHMS), "chunk_size": chunk_size, "num_chunks": nchunks,
        "manifest_size": len(manifest_raw), "manifest_ciphertext_size": len(manifest_raw) + TAG_SIZE,
        "payload_size": payload_size, "payload_ciphertext_size": payload_size + TAG_SIZE * nchunks,
    }
    fixed = {**fields, "format_version": 1}
    content_key = os.urandom(32)
    rlist = []
    for r in recipients:
        wrapped = HPKE_SUITE.encrypt(content_key, r.kem_key(), info=wrap_info(fixed, r.centre_id, r.kem_key_id))
        rlist.append({"centre": r.centre_id, "kem_key_id": r.kem_key_id,
                      "enc": _b64(wrapped[:ENC_SIZE]), "wrapped_key": _b64(wrapped[ENC_SIZE:])})
    fields["recipients"] = rlist
    header_raw = canonical_json(fields)
    hh = hashlib.sha256(header_raw).digest()
    aead = AESGCM(content_key)
    digest = hashlib.sha256()

    def emit(b: bytes) -> None:
        digest.update(b)
        out.write(b)

    emit(encode_prefix(header_raw) + header_raw)
    emit(aead.encrypt(MANIFEST_NONCE, manifest_raw, MANIFEST_AAD + hh))
    pieces = (piece for p in parts for piece in p.pieces())
    bar = progress(total=nchunks, desc="seal", unit="chunk", **_quiet_if_small(nchunks))
    for i, block in enumerate(_rechunk(pieces, chunk_size)):
        emit(aead.encrypt(chunk_nonce(i), block, chunk_aad(hh, i, i == nchunks - 1)))
        bar.update(1)
    bar.close()
    if i != nchunks - 1:  # noqa: F821 - the loop always runs at least once
        raise FormatError(f"bundle {bundle_id}: wrote {i + 1} chunks, planned {nchunks}")
    out.write(sender.sign(signed_message(digest.digest())))


def _quiet_if_small(n: int) -> dict:
    return {} if n > 64 else {"disable": True}


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def seal(patchset: PatchSet, sender: Identity, recipients: list[PublicIdentity], out: str | Path | None = None,
         privacy_report: dict | None = None, extra_manifest: dict | None = None, *,
         chunk_size: int = DEFAULT_CHUNK_SIZE) -> bytes | Path:
    """Encrypt ``patchset`` for ``recipients`` and sign it as ``sender``.

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
    bundle_id = os.urandom(16).hex()
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts = payload_parts(patchset)
    manifest = _manifest(patchset, bundle_id, sender, created, parts, privacy_report, extra_manifest)
    if out is None:
        buf = io.BytesIO()
        _write_bundle(buf, sender, uniq, manifest, parts, bundle_id, created, chunk_size)
        return buf.getvalue()
    out = Path(out)
    with atomic_writer(out) as fh:
        _write_bundle(fh, sender, uniq, manifest, parts, bundle_id, created, chunk_size)
    log.info("sealed bundle %s for %s -> %s", bundle_id, [r.centre_id for r in uniq], out)
    return out


# ====================================================================== reading
def inspect(data_or_path: Source, limits: Limits = Limits()) -> BundleHeader:
    """Parse and validate the public header and layout; needs no key, checks no signature."""
    with BundleSource(data_or_path) as src:
        return parse_header(src, limits)


def _check_signature(src: BundleSource, header: BundleHeader, trust: TrustStore) -> bytes:
    signer = trust.signer(header.source_centre, header.sign_key_id)
    digest = src.hash_range(0, header.signature_offset)
    sig = src.read_at(header.signature_offset, SIGNATURE_SIZE)
    try:
        signer.verify_key().verify(sig, signed_message(digest))
    except InvalidSignature as exc:
        raise SignatureError(f"{src.name}: signature does not match (bundle altered or corrupted; "
                             f"claimed signer {header.source_centre})") from exc
    return digest


def verify(data_or_path: Source, trust: TrustStore, limits: Limits = Limits()) -> BundleHeader:
    """Check format, sizes, signer trust and signature; decrypts nothing (the coordinator's check)."""
    with BundleSource(data_or_path) as src:
        header = parse_header(src, limits)
        _check_signature(src, header, trust)
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
    if set(m) != MANIFEST_KEYS:
        raise SemanticError(f"{where}: manifest fields differ from version 1")
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


def _decrypt_payload(src: BundleSource, header: BundleHeader, aead: AESGCM, parts: list[dict],
                     tmp: Path, digest: bytes) -> dict[str, Path]:
    """Decrypt chunks into one file per part, hashing each part and re-hashing the ciphertext."""
    hh = header.header_sha256
    files = {p["name"]: tmp / f"{p['name']}.part" for p in parts}
    hashers = {p["name"]: hashlib.sha256() for p in parts}
    whole = hashlib.sha256()
    whole.update(src.read_at(0, header.payload_offset))
    pos = 0
    n = header.num_chunks
    with contextlib.ExitStack() as stack:
        fhs = {k: stack.enter_context(open(f, "wb")) for k, f in files.items()}
        bar = progress(range(n), desc="open", unit="chunk", **_quiet_if_small(n))
        for i in bar:
            off, length = header.chunk_span(i)
            ct = src.read_at(off, length)
            whole.update(ct)
            try:
                pt = aead.decrypt(chunk_nonce(i), ct, chunk_aad(hh, i, i == n - 1))
            except InvalidTag as exc:
                raise DecryptionError(f"{header.name}: chunk {i} of {n} failed authentication "
                                      "(reordered, truncated or altered)") from exc
            end = pos + len(pt)
            for p in parts:  # route the plaintext to the part(s) it overlaps
                a, b = max(pos, p["offset"]), min(end, p["offset"] + p["size"])
                if a < b:
                    piece = pt[a - pos:b - pos]
                    hashers[p["name"]].update(piece)
                    fhs[p["name"]].write(piece)
            pos = end
    if whole.digest() != digest:
        raise SignatureError(f"{header.name}: bundle bytes changed while being opened")
    for p in parts:
        if hashers[p["name"]].hexdigest() != p["sha256"]:
            raise ManifestHashError(f"{header.name}: payload part {p['name']} does not match its manifest SHA-256")
    return files


def open_bundle(data_or_path: Source, identity: Identity, trust: TrustStore, ledger: Ledger | None = None,
                out_dir: str | Path | None = None, limits: Limits = Limits()) -> OpenedBundle:
    """Verify, decrypt and check a bundle; write its patch set atomically to ``out_dir`` if given.

    Checks, in order: format/version (:class:`FormatError`, :class:`VersionError`), sizes
    (:class:`SizeLimitError`), signer (:class:`UntrustedSignerError`, :class:`RevokedSignerError`),
    signature (:class:`SignatureError`), recipient (:class:`NotARecipientError`), decryption
    (:class:`DecryptionError`), manifest hashes (:class:`ManifestHashError`), replay
    (:class:`ReplayError`), semantics (:class:`SemanticError`).
    """
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None and out_dir.exists():
        raise OutputExistsError(f"{out_dir}: output already exists (choose a new directory)")
    with BundleSource(data_or_path) as src:
        header = parse_header(src, limits)
        digest = _check_signature(src, header, trust)
        key = _unwrap_key(header, identity)
        aead = AESGCM(key)
        mct = src.read_at(header.manifest_offset, header.fields["manifest_ciphertext_size"])
        try:
            mraw = aead.decrypt(MANIFEST_NONCE, mct, MANIFEST_AAD + header.header_sha256)
        except InvalidTag as exc:
            raise DecryptionError(f"{header.name}: manifest failed authentication") from exc
        try:
            manifest = json.loads(mraw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise SemanticError(f"{header.name}: manifest is not valid JSON") from exc
        manifest = _check_manifest(manifest, header)
        tmp_parent = out_dir.parent if out_dir is not None and out_dir.parent.is_dir() else None
        tmp = Path(tempfile.mkdtemp(prefix=".bundle-open.", dir=tmp_parent))
        try:
            files = _decrypt_payload(src, header, aead, manifest["payload_parts"], tmp, digest)
            if config_hash(manifest["distillation_config"]) != manifest["distillation_config_sha256"]:
                raise ManifestHashError(f"{header.name}: distillation config does not match its manifest SHA-256")
            if ledger is not None:
                ledger.check(header.bundle_id, where=header.name)
            ps = read_payload(files["tensors"], files["slides"], manifest, header.name)
            receipt = {"header": header.summary(), "manifest": manifest, "opened_by": identity.centre_id,
                       "signature": {"verified": True, "signer": header.source_centre,
                                     "sign_key_id": header.sign_key_id},
                       "limits": limits.__dict__}
            claim = (ledger.claim(header.bundle_id, {"source": header.source_centre, "created": header.created},
                                  where=header.name) if ledger is not None else contextlib.nullcontext())
            with claim:
                if out_dir is not None:
                    with atomic_directory(out_dir, overwrite=False) as d:
                        ps.save(d)
                        atomic_write_json(d / RECEIPT_FILE, receipt)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("opened bundle %s from %s (%d patches)", header.bundle_id, header.source_centre, len(ps))
    return OpenedBundle(patchset=ps, manifest=manifest, header=header, out_dir=out_dir)

