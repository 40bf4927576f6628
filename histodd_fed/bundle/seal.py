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

This module holds the crypto and the order of the checks; the manifest's contents are built and
checked in :mod:`.manifest`, the passes over the bytes run in :mod:`.stream`, and the container
layout (header, nonces, AADs) is :mod:`.format`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import io
import logging
import os
import re
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from histodd_fed.atomic import atomic_directory, atomic_write_json, atomic_writer
from histodd_fed.bundle.bounded_json import MAX_DEPTH, check_bounds, loads_bounded
from histodd_fed.bundle.errors import (DecryptionError, FormatError, KeyCommitmentError, KeyFileError,
                                       ManifestHashError, NotARecipientError, OutputExistsError, SemanticError,
                                       SignatureError, StaleBundleError, VersionError)
from histodd_fed.bundle.format import (ALGORITHMS, DEFAULT_CHUNK_SIZE, ENC_SIZE, FORMAT_VERSION, MANIFEST_AAD,
                                       MANIFEST_NONCE, MIN_CHUNK_SIZE, READ_VERSIONS, SIGNATURE_SIZE, TAG_SIZE,
                                       BundleHeader, BundleSource, Limits, Source, canonical_json, chunk_aad,
                                       chunk_count, chunk_nonce, encode_prefix, key_commitment, parse_created,
                                       parse_header, signed_message, wrap_info)
from histodd_fed.bundle.identity import Identity, PublicIdentity
from histodd_fed.bundle.ledger import NO_LEDGER, Ledger, _NoLedger
from histodd_fed.bundle.manifest import build_manifest, check_manifest
from histodd_fed.bundle.payload import PayloadPart, decode_payload, payload_parts
from histodd_fed.bundle.stream import (THREAD_MIN_BYTES, Lane, cut_chunks, hash_pass, part_sha256, quiet_if_small,
                                       stream_bundle, wait_done)
from histodd_fed.bundle.trust import TrustStore
from histodd_fed.logging_setup import progress
from histodd_fed.patchset import PatchSet
from histodd_fed.runconfig import config_hash

log = logging.getLogger(__name__)

HPKE_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
RECEIPT_FILE = "bundle_receipt.json"


@dataclass
class OpenedBundle:
    """The result of :func:`open_bundle`."""

    patchset: PatchSet
    manifest: dict
    header: BundleHeader
    out_dir: Path | None = None


# ====================================================================== sealing
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
    bar = progress(total=nchunks, desc="seal", unit="chunk", **quiet_if_small(nchunks))
    with bar, Lane(threaded) as hasher:
        for i, block in enumerate(cut_chunks(pieces, chunk_size)):
            if i >= nchunks or total + block.nbytes > payload_size:
                raise FormatError(f"bundle {bundle_id}: payload parts hold more than the {payload_size} "
                                  "bytes they declare")
            slot = i % nbuf
            wait_done(busy[slot])  # the worker is done hashing what this buffer held
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
    manifest = build_manifest(patchset, bundle_id, sender, created, parts, privacy_report, extra_manifest, release)
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
        digest = hash_pass(src, header, data_or_path if type(data_or_path) is bytes else None)
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
        digest = hash_pass(src, header, blob)
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
        done = stream_bundle(src, header, aead, "open", blob, hash_ct=not immutable)
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
    manifest = check_manifest(manifest, header)
    for p in manifest["payload_parts"]:
        if part_sha256(done, p["offset"], p["offset"] + p["size"]) != p["sha256"]:
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
