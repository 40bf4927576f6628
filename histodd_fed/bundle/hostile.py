"""Seeded hostile mutations of a valid bundle, each with the error class it must raise.

Used by the test battery (``tests/test_bundle_hostile.py``) and the fuzz benchmark
(``benchmarks/fuzz_bundles.py``). Every mutation names the region it hits and the exact
exception classes an open may raise for it; anything else (another class, a non-bundle
exception, or success) is a defect.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from histodd_fed.bundle.errors import (DecryptionError, FormatError, SignatureError, SizeLimitError,
                                       UnsupportedAlgorithmError, UntrustedSignerError, VersionError)
from histodd_fed.bundle.format import (PREFIX_SIZE, SIGNATURE_SIZE, TAG_SIZE, BundleHeader, BundleSource,
                                       canonical_json, encode_prefix, parse_header, signed_message)

HEADER_FLIP_ERRORS = (FormatError, UnsupportedAlgorithmError, SizeLimitError, UntrustedSignerError,
                      SignatureError)


@dataclass(frozen=True)
class Mutation:
    """A mutated bundle and the error classes opening it may raise (exact classes)."""

    kind: str
    region: str
    data: bytes
    expected: tuple[type, ...]


def regions(h: BundleHeader) -> list[tuple[str, int, int]]:
    """(name, start, end) of every region of the file."""
    out = [("magic", 0, 8), ("version", 8, 10), ("header_length", 10, 14),
           ("header", PREFIX_SIZE, h.manifest_offset), ("manifest", h.manifest_offset, h.payload_offset)]
    for i in range(h.num_chunks):
        off, n = h.chunk_span(i)
        out.append((f"chunk{i}", off, off + n))
    out.append(("signature", h.signature_offset, h.signature_offset + SIGNATURE_SIZE))
    return out


def _expected_for_flip(region: str) -> tuple[type, ...]:
    if region == "magic":
        return (FormatError,)
    if region == "version":
        return (VersionError,)
    if region == "header_length":
        return (FormatError, SizeLimitError)
    if region == "header":
        return HEADER_FLIP_ERRORS
    return (SignatureError,)


def _rebuild(blob: bytes, h: BundleHeader, fields: dict, body: bytes | None = None) -> bytes:
    """``blob`` with its header replaced by canonical ``fields`` (signature left stale)."""
    raw = canonical_json(fields)
    rest = blob[h.manifest_offset:] if body is None else body
    return encode_prefix(raw, h.version) + raw + rest


def _resign(data: bytes, sign: Callable[[bytes], bytes]) -> bytes:
    body = data[:-SIGNATURE_SIZE]
    return body + sign(signed_message(hashlib.sha256(body).digest()))


class Mutator:
    """Produces seeded mutations of one valid bundle ``blob``.

    ``sign`` (the sender's signing function) enables the 'resigned' kinds that model a trusted
    but malicious or buggy sender: they pass the signature and must fail further in.
    """

    def __init__(self, blob: bytes, sign: Callable[[bytes], bytes] | None = None):
        self.blob = bytes(blob)
        with BundleSource(self.blob) as src:
            self.h = parse_header(src)
        self.regions = regions(self.h)
        self.sign = sign
        if self.h.num_chunks < 3:
            raise ValueError("use a bundle with at least 3 chunks (small chunk_size) for the battery")

    # -- single mutations ----------------------------------------------------------
    def bitflip(self, rng: np.random.Generator, region: str | None = None) -> Mutation:
        if region is None:
            name, a, b = self.regions[int(rng.integers(len(self.regions)))]
        else:
            name, a, b = next(r for r in self.regions if r[0] == region)
        pos = int(rng.integers(a, b))
        d = bytearray(self.blob)
        d[pos] ^= 1 << int(rng.integers(8))
        kind_region = "chunk" if name.startswith("chunk") else name
        return Mutation("bitflip", kind_region, bytes(d), _expected_for_flip(name))

    def truncate(self, rng: np.random.Generator) -> Mutation:
        k = int(rng.integers(0, len(self.blob)))
        exp = (FormatError,) if k < PREFIX_SIZE else (SizeLimitError,)
        return Mutation("truncate", "file", self.blob[:k], exp)

    def append(self, rng: np.random.Generator) -> Mutation:
        n = int(rng.integers(1, 4096))
        return Mutation("append", "file", self.blob + rng.bytes(n), (SizeLimitError,))

    def swap_chunks(self, rng: np.random.Generator, resign: bool = False) -> Mutation:
        i, j = (int(x) for x in rng.choice(self.h.num_chunks - 1, size=2, replace=False))
        (oi, n), (oj, _) = self.h.chunk_span(i), self.h.chunk_span(j)
        d = bytearray(self.blob)
        d[oi:oi + n], d[oj:oj + n] = self.blob[oj:oj + n], self.blob[oi:oi + n]
        if resign:
            return Mutation("swap_resigned", "chunk", _resign(bytes(d), self.sign), (DecryptionError,))
        return Mutation("swap", "chunk", bytes(d), (SignatureError,))

    def drop_last_chunk_resigned(self) -> Mutation:
        """Truncate the payload by a chunk and fix the header to match, then re-sign."""
        h, f = self.h, dict(self.h.fields)
        f["num_chunks"] -= 1
        f["payload_size"] = f["num_chunks"] * f["chunk_size"]
        f["payload_ciphertext_size"] = f["payload_size"] + TAG_SIZE * f["num_chunks"]
        body = self.blob[h.manifest_offset:h.chunk_span(h.num_chunks - 1)[0]] + bytes(SIGNATURE_SIZE)
        return Mutation("drop_chunk_resigned", "chunk", _resign(_rebuild(self.blob, h, f, body), self.sign),
                        (DecryptionError,))

    def header_edit(self, rng: np.random.Generator) -> Mutation:
        """A well-formed but hostile header: downgrade, huge sizes, other values, bad version."""
        f = json.loads(json.dumps(self.h.fields))
        choice = int(rng.integers(8))
        if choice == 0:
            key = str(rng.choice(sorted(f["algorithms"])))
            f["algorithms"][key] = str(rng.choice(["AES-128-GCM", "none", "ChaCha20-Poly1305", "Ed448", "MD5"]))
            return Mutation("downgrade", "header", _rebuild(self.blob, self.h, f), (UnsupportedAlgorithmError,))
        if choice == 1:  # consistent but huge sizes
            f["payload_size"] = 1 << int(rng.integers(40, 62))
            f["num_chunks"] = -(-f["payload_size"] // f["chunk_size"])
            f["payload_ciphertext_size"] = f["payload_size"] + TAG_SIZE * f["num_chunks"]
            return Mutation("huge_payload", "header", _rebuild(self.blob, self.h, f), (SizeLimitError,))
        if choice == 2:
            f["chunk_size"] = 1 << int(rng.integers(27, 62))
            return Mutation("huge_chunk", "header", _rebuild(self.blob, self.h, f), (SizeLimitError,))
        if choice == 3:
            f["manifest_size"] = 1 << int(rng.integers(23, 62))
            f["manifest_ciphertext_size"] = f["manifest_size"] + TAG_SIZE
            return Mutation("huge_manifest", "header", _rebuild(self.blob, self.h, f), (SizeLimitError,))
        if choice == 4:
            f["created"] = "2000-01-01T00:00:00+00:00"
            return Mutation("edit_created", "header", _rebuild(self.blob, self.h, f), (SignatureError,))
        if choice == 5:
            f["recipients"] = f["recipients"][:1] * 2
            return Mutation("dup_recipient", "header", _rebuild(self.blob, self.h, f), (FormatError,))
        if choice == 6:
            raw = json.dumps(self.h.fields, sort_keys=True).encode()  # not canonical (spaces)
            return Mutation("noncanonical", "header",
                            encode_prefix(raw, self.h.version) + raw + self.blob[self.h.manifest_offset:],
                            (FormatError,))
        version = int(rng.integers(3, 1 << 16))  # 1 and 2 are both read
        d = bytearray(self.blob)
        d[8:10] = struct.pack(">H", version)
        return Mutation("version", "version", bytes(d), (VersionError,))

    # -- streams ---------------------------------------------------------------------
    def random(self, rng: np.random.Generator) -> Mutation:
        r = float(rng.random())
        if r < 0.70:
            return self.bitflip(rng)
        if r < 0.80:
            return self.truncate(rng)
        if r < 0.85:
            return self.append(rng)
        if r < 0.90:
            return self.swap_chunks(rng)
        if r < 0.93 and self.sign is not None:
            return self.swap_chunks(rng, resign=True) if r < 0.915 else self.drop_last_chunk_resigned()
        return self.header_edit(rng)

    def stream(self, seed: int, n: int) -> Iterator[Mutation]:
        rng = np.random.default_rng(seed)
        for _ in range(n):
            yield self.random(rng)

    def every_region(self, seed: int, per_region: int) -> Iterator[Mutation]:
        """``per_region`` bit flips in each region (header, manifest, every chunk, signature ...)."""
        rng = np.random.default_rng(seed)
        for name, _, _ in self.regions:
            for _ in range(per_region):
                yield self.bitflip(rng, region=name)


# ---------------------------------------------------------------------- attacker tooling
def forge_bundle(ps, sender, recipients, *, bundle_id: str | None = None, created: str | None = None,
                 chunk_size: int = 256, extra: dict | None = None, manifest_fields: dict | None = None,
                 **writer_kw) -> bytes:
    """A bundle sealed by ``sender`` with an attacker-chosen ``bundle_id`` / ``created`` (the writer
    itself, so the result is validly signed by whoever holds ``sender``'s key). ``manifest_fields``
    replace manifest fields as they are, after the sealing checks (``seal`` would refuse them)."""
    import io
    import os
    from datetime import datetime, timezone

    from histodd_fed.bundle.payload import payload_parts
    from histodd_fed.bundle.manifest import build_manifest
    from histodd_fed.bundle.seal import _write_bundle

    parts = payload_parts(ps)
    bid = bundle_id or os.urandom(16).hex()
    created = created or datetime.now(timezone.utc).isoformat(timespec="seconds")
    m = {**build_manifest(ps, bid, sender, created, parts, None, extra), **(manifest_fields or {})}
    buf = io.BytesIO()
    _write_bundle(buf, sender, list(recipients), m, parts, bid, created, chunk_size, **writer_kw)
    return buf.getvalue()


# AES-GCM is not key-committing: with two keys one may solve for a ciphertext block so that the
# same ciphertext and tag authenticate under both (Dodis et al. 2018, "invisible salamanders").
_GCM_R = 0xE1 << 120


def _gf_mul(x: int, y: int) -> int:
    """Multiplication in GF(2^128) with GCM's bit order (NIST SP 800-38D, algorithm 1)."""
    z, v = 0, x
    for i in range(127, -1, -1):
        if (y >> i) & 1:
            z ^= v
        v = (v >> 1) ^ _GCM_R if v & 1 else v >> 1
    return z


def _gf_pow(x: int, e: int) -> int:
    r = 1 << 127  # the field's one in GCM bit order
    while e:
        if e & 1:
            r = _gf_mul(r, x)
        x = _gf_mul(x, x)
        e >>= 1
    return r


def _blocks(b: bytes) -> list[int]:
    b = b + bytes(-len(b) % 16)
    return [int.from_bytes(b[i:i + 16], "big") for i in range(0, len(b), 16)]


def _aes_ecb(key: bytes, block: bytes) -> int:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return int.from_bytes(enc.update(block) + enc.finalize(), "big")


def _ghash(h: int, aad: bytes, ct: bytes) -> int:
    y = 0
    for x in _blocks(aad) + _blocks(ct) + [((len(aad) * 8) << 64) | (len(ct) * 8)]:
        y = _gf_mul(y ^ x, h)
    return y


def gcm_two_key_ciphertext(k1: bytes, k2: bytes, nonce: bytes, aad: bytes, ciphertext: bytes,
                           free_block: int) -> bytes:
    """``ciphertext`` (no tag) with block ``free_block`` rewritten so that ciphertext || tag
    authenticates under both ``k1`` and ``k2`` (96-bit nonce). Decrypting under each key gives
    different plaintexts; the free block decrypts to noise under both."""
    ct = bytearray(ciphertext)
    if len(ct) < 16 * (free_block + 1):
        raise ValueError("ciphertext too short for the free block")
    ct[16 * free_block:16 * (free_block + 1)] = bytes(16)
    j0 = nonce + b"\x00\x00\x00\x01"
    h1, h2 = _aes_ecb(k1, bytes(16)), _aes_ecb(k2, bytes(16))
    s1, s2 = _aes_ecb(k1, j0) ^ _ghash(h1, aad, bytes(ct)), _aes_ecb(k2, j0) ^ _ghash(h2, aad, bytes(ct))
    m = len(_blocks(aad)) + len(_blocks(bytes(ct))) + 1
    e = m - (len(_blocks(aad)) + free_block + 1) + 1
    coeff = _gf_pow(h1, e) ^ _gf_pow(h2, e)
    x = _gf_mul(s1 ^ s2, _gf_pow(coeff, (1 << 128) - 2))
    ct[16 * free_block:16 * (free_block + 1)] = x.to_bytes(16, "big")
    tag = _aes_ecb(k1, j0) ^ _ghash(h1, aad, bytes(ct))
    return bytes(ct) + tag.to_bytes(16, "big")


def forge_split_key_bundle(ps, sender, main, other, *, version: int, chunk_size: int = 4096) -> bytes:
    """A validly signed bundle from ``sender`` for ``main`` and ``other`` in which ``other`` is
    wrapped a *different* content key, and the manifest and every chunk authenticate under both
    keys: one signature, two contents. Version 2's key commitment names ``main``'s key."""
    import os

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from histodd_fed.bundle.payload import payload_parts
    from histodd_fed.bundle.format import MANIFEST_AAD, MANIFEST_NONCE, chunk_aad, chunk_count, chunk_nonce
    from histodd_fed.bundle.manifest import build_manifest
    from histodd_fed.bundle.seal import _sealed_header

    parts = payload_parts(ps)
    payload = b"".join(bytes(piece) for p in parts for piece in p.pieces())
    bid = os.urandom(16).hex()
    from datetime import datetime, timezone
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest_raw = canonical_json(build_manifest(ps, bid, sender, created, parts, None, None))
    k_other = os.urandom(32)
    header_raw, k_main = _sealed_header(sender, [main, other], manifest_raw, len(payload), bid, created,
                                        chunk_size, version, {other.centre_id: k_other})
    hh = hashlib.sha256(header_raw).digest()

    def both(nonce: bytes, aad: bytes, pt: bytes) -> bytes:
        ct = AESGCM(k_main).encrypt(nonce, pt, aad)[:-TAG_SIZE]
        return gcm_two_key_ciphertext(k_main, k_other, nonce, aad, ct, len(pt) // 16 - 1)

    body = encode_prefix(header_raw, version) + header_raw + both(MANIFEST_NONCE, MANIFEST_AAD + hh, manifest_raw)
    n = chunk_count(len(payload), chunk_size)
    for i in range(n):
        body += both(chunk_nonce(i), chunk_aad(hh, i, i == n - 1), payload[i * chunk_size:(i + 1) * chunk_size])
    return body + sender.sign(signed_message(hashlib.sha256(body).digest()))
