"""The single-pass bundle reader and zero-copy writer: format compatibility, error order, edge sizes.

``_old_write_bundle`` below is the writer as it was before the fast path (allocating
``AESGCM.encrypt``, a re-chunking copy), kept here as the golden producer of version-1 bundles;
``_reference_open`` is an independent two-pass reader (hash everything, verify, decrypt each chunk
with allocating ``decrypt``, parse with the ``safetensors`` library). Bundles must cross between
old and new code in both directions.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from datetime import datetime, timezone

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from histodd_fed.bundle import (NO_LEDGER, BundleError, DecryptionError, FormatError, NotARecipientError, SemanticError,
                                SignatureError, TrustStore, generate_identity, open_bundle, seal, verify)
from histodd_fed.bundle.format import (CHUNK_AAD, MANIFEST_AAD, MANIFEST_NONCE, SIGNATURE_SIZE, TAG_SIZE, BundleSource,
                                       canonical_json, chunk_aad, chunk_count, chunk_nonce, encode_prefix, parse_header,
                                       signed_message)
from histodd_fed.bundle.manifest import build_manifest
from histodd_fed.bundle.payload import PayloadPart, payload_parts
from histodd_fed.bundle.seal import _sealed_header, _unwrap_key, _write_bundle
from histodd_fed.bundle.stream import THREAD_MIN_BYTES, cut_chunks
from histodd_fed.patchset import PatchSet


# ---------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    root = tmp_path_factory.mktemp("fastpath_keys")
    out = {c: generate_identity(c, root / c) for c in ("C1", "C2", "C3")}
    out["trust"] = TrustStore.load(root / "C2")
    out["trust"].add(out["C1"].public)
    return out


def _ps(n: int, hw: int = 16, seed: int = 0, coords: bool = True, slides: int = 3) -> PatchSet:
    rng = np.random.default_rng(seed)
    sids = [f"slide-{i}" for i in range(slides)]
    return PatchSet(images=rng.integers(0, 256, (n, hw, hw, 3), dtype=np.uint8), labels=np.arange(n) % 2,
                    class_names=["normal", "tumour"],
                    slide_index=(np.arange(n) % max(slides, 1) if slides else np.full(n, -1)).astype(np.int32),
                    slide_ids=sids, slide_labels={s: i % 2 for i, s in enumerate(sids)},
                    coords=rng.integers(0, 10_000, (n, 2)) if coords else None, kind="synthetic",
                    meta={"seed": seed})


def _same(a: PatchSet, b: PatchSet) -> None:
    assert a.images.shape == b.images.shape and np.array_equal(a.images, b.images)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.slide_index, b.slide_index)
    assert a.slide_ids == b.slide_ids and a.slide_labels == b.slide_labels and a.class_names == b.class_names
    assert (a.coords is None) == (b.coords is None)
    if a.coords is not None:
        assert np.array_equal(a.coords, b.coords)
    assert a.kind == b.kind and a.meta == b.meta


def _old_rechunk(pieces, size):
    buf = bytearray()
    for p in pieces:
        buf += p
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    yield bytes(buf)


def _old_write_bundle(out, sender, recipients, manifest, parts, bundle_id, created, chunk_size) -> None:
    """The pre-fast-path writer, step for step (golden producer of version-1 bytes: no key commitment)."""
    manifest_raw = canonical_json(manifest)
    payload_size = sum(p.size for p in parts)
    nchunks = chunk_count(payload_size, chunk_size)
    header_raw, content_key = _sealed_header(sender, recipients, manifest_raw, payload_size, bundle_id, created,
                                             chunk_size, 1)  # version 1: no key commitment
    hh = hashlib.sha256(header_raw).digest()
    aead = AESGCM(content_key)
    digest = hashlib.sha256()

    def emit(b: bytes) -> None:
        digest.update(b)
        out.write(b)

    emit(encode_prefix(header_raw, 1) + header_raw)
    emit(aead.encrypt(MANIFEST_NONCE, manifest_raw, MANIFEST_AAD + hh))
    pieces = (bytes(piece) for p in parts for piece in p.pieces())
    for i, block in enumerate(_old_rechunk(pieces, chunk_size)):
        emit(aead.encrypt(chunk_nonce(i), block, CHUNK_AAD + hh + struct.pack(">QB", i, 1 if i == nchunks - 1 else 0)))
    assert i == nchunks - 1  # noqa: F821
    out.write(sender.sign(signed_message(digest.digest())))


def _sealed_with(writer, ps: PatchSet, sender, recipient, chunk_size: int, parts=None, edit=None) -> bytes:
    parts = payload_parts(ps) if parts is None else parts
    bid, created = os.urandom(16).hex(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    m = build_manifest(ps, bid, sender, created, parts, None, None)
    if edit is not None:
        edit(m)
    buf = io.BytesIO()
    writer(buf, sender, [recipient], m, parts, bid, created, chunk_size)
    return buf.getvalue()


def _reference_open(blob: bytes, identity, signer) -> PatchSet:
    """An independent two-pass reader (allocating decrypt, safetensors library)."""
    from safetensors.numpy import load

    with BundleSource(blob) as src:
        h = parse_header(src)
    signer.verify_key().verify(blob[h.signature_offset:], signed_message(hashlib.sha256(blob[:h.signature_offset]).digest()))
    aead = AESGCM(_unwrap_key(h, identity))
    m = json.loads(aead.decrypt(MANIFEST_NONCE, blob[h.manifest_offset:h.payload_offset], MANIFEST_AAD + h.header_sha256))
    payload = b"".join(aead.decrypt(chunk_nonce(i), blob[o:o + n], chunk_aad(h.header_sha256, i, i == h.num_chunks - 1))
                       for i, (o, n) in enumerate(h.chunk_span(i) for i in range(h.num_chunks)))
    assert len(payload) == h.fields["payload_size"]
    t, s = m["payload_parts"]
    assert hashlib.sha256(payload[:t["size"]]).hexdigest() == t["sha256"]
    assert hashlib.sha256(payload[t["size"]:]).hexdigest() == s["sha256"]
    arrays = load(payload[:t["size"]])
    slides = json.loads(payload[t["size"]:])
    return PatchSet(images=arrays["images"], labels=arrays["labels"], class_names=m["class_names"],
                    slide_index=arrays["slide_index"], slide_ids=slides["slide_ids"],
                    slide_labels=slides["slide_labels"], coords=arrays.get("coords"), kind=m["kind"],
                    meta=m["distillation_config"])


def _refused(blob: bytes, ids, expected: type, identity=None) -> BundleError:
    with pytest.raises(BundleError) as ei:
        open_bundle(blob, identity or ids["C2"], ids["trust"], NO_LEDGER)
    assert type(ei.value) is expected, f"raised {type(ei.value).__name__} ({ei.value}), expected {expected.__name__}"
    assert "\n" not in str(ei.value)
    return ei.value


def _resign(data: bytes, sender) -> bytes:
    body = data[:-SIGNATURE_SIZE]
    return body + sender.sign(signed_message(hashlib.sha256(body).digest()))


# ---------------------------------------------------------------------- chunker
def test_chunks_are_exact_and_zero_copy_inside_pieces():
    rng = np.random.default_rng(1)
    for trial in range(60):
        size = int(rng.integers(64, 300))
        lens = [int(x) for x in rng.integers(0, 700, int(rng.integers(0, 6)))]
        if trial % 7 == 0:  # total an exact multiple of size
            lens = [size * 2 - 5, 5, size]
        pieces = [memoryview(rng.bytes(n)) for n in lens]
        whole = b"".join(bytes(p) for p in pieces)
        blocks = [bytes(b) for b in cut_chunks(iter(pieces), size)]
        assert b"".join(blocks) == whole
        assert len(blocks) == chunk_count(len(whole), size), (lens, size)
        assert all(len(b) == size for b in blocks[:-1]) and 0 < len(blocks[-1]) <= size or whole == b""
    big = memoryview(np.arange(4096, dtype=np.uint8))
    first = next(cut_chunks(iter([big]), 1024))
    assert first.obj is big.obj  # a block inside one piece is a view, not a copy


# ---------------------------------------------------------------------- compatibility
@pytest.mark.parametrize("chunk_size", [64, 100, 1000, 1 << 20])
def test_old_writer_bundles_open_with_the_new_reader(ids, chunk_size):
    ps = _ps(5, seed=chunk_size)
    blob = _sealed_with(_old_write_bundle, ps, ids["C1"], ids["C2"].public, chunk_size)
    h = parse_header(BundleSource(blob))
    assert h.version == 1 and "key_commitment" not in h.fields
    _same(ps, open_bundle(blob, ids["C2"], ids["trust"], NO_LEDGER).patchset)
    verify(blob, ids["trust"])


@pytest.mark.parametrize("n,chunk_size", [(5, 64), (7, 333), (3, 1 << 20)])
def test_new_writer_bundles_open_with_a_reference_reader(ids, n, chunk_size):
    ps = _ps(n, seed=n)
    blob = seal(ps, ids["C1"], [ids["C2"].public], chunk_size=chunk_size)
    _same(ps, _reference_open(blob, ids["C2"], ids["C1"].public))


def test_threaded_path_many_chunks_file_and_bytes(ids, tmp_path):
    """A payload above THREAD_MIN_BYTES with 4 KiB chunks: worker threads, hash-state resumption."""
    n = THREAD_MIN_BYTES // (32 * 32 * 3) + 40
    ps = _ps(n, hw=32, seed=3)
    path = seal(ps, ids["C1"], [ids["C2"].public], out=tmp_path / "big.hdb", chunk_size=4096)
    blob = path.read_bytes()
    assert parse_header(BundleSource(blob)).num_chunks > 1024
    for src in (path, blob):
        ob = open_bundle(src, ids["C2"], ids["trust"], NO_LEDGER)
        _same(ps, ob.patchset)
        assert ob.patchset.images.flags.writeable
    _same(ps, _reference_open(blob, ids["C2"], ids["C1"].public))
    verify(path, ids["trust"])


# ---------------------------------------------------------------------- sizes
def test_chunk_boundaries_inside_the_safetensors_header(ids):
    ps = _ps(2, hw=4, seed=5)
    head = 8 + struct.unpack("<Q", bytes(next(payload_parts(ps)[0].pieces()))[:8])[0]
    assert head > 3 * 64  # the header alone spans several 64-byte chunks
    for cs in (64, 72, 96, 127):
        blob = seal(ps, ids["C1"], [ids["C2"].public], chunk_size=cs)
        _same(ps, open_bundle(blob, ids["C2"], ids["trust"], NO_LEDGER).patchset)


def test_empty_and_tiny_payloads(ids):
    empty = PatchSet(images=np.zeros((0, 8, 8, 3), np.uint8), labels=np.zeros(0, np.int64),
                     class_names=["a", "b"], kind="synthetic")
    one = PatchSet(images=np.full((1, 1, 1, 3), 7, np.uint8), labels=np.array([1]), class_names=["a", "b"],
                   kind="synthetic")
    for ps in (empty, one):
        for cs in (64, 1 << 20):
            blob = seal(ps, ids["C1"], [ids["C2"].public], chunk_size=cs)
            _same(ps, open_bundle(blob, ids["C2"], ids["trust"], NO_LEDGER).patchset)
            _same(ps, _reference_open(blob, ids["C2"], ids["C1"].public))


def test_payload_an_exact_multiple_of_the_chunk_size(ids):
    """No trailing empty chunk (the old writer emitted one and then refused its own bundle)."""
    for k in range(40):  # slide ids of varying length until the payload divides by 64
        ps = _ps(2, hw=4, seed=1, slides=1)
        ps.slide_ids = ["s" * (k + 1)]
        ps.slide_labels = {ps.slide_ids[0]: 0}
        size = sum(p.size for p in payload_parts(ps))
        if size % 64 == 0:
            break
    else:
        pytest.fail("no payload size divisible by 64 found")
    blob = seal(ps, ids["C1"], [ids["C2"].public], chunk_size=64)
    h = parse_header(BundleSource(blob))
    assert h.num_chunks == size // 64 and h.chunk_span(h.num_chunks - 1)[1] == 64 + TAG_SIZE
    _same(ps, open_bundle(blob, ids["C2"], ids["trust"], NO_LEDGER).patchset)


# ---------------------------------------------------------------------- error order
@pytest.mark.parametrize("n,chunk_size", [(6, 256), (THREAD_MIN_BYTES // 768 + 8, 1 << 16)])
def test_bad_chunk_and_bad_signature_is_a_signature_error(ids, n, chunk_size):
    ps = _ps(n, seed=9)
    blob = seal(ps, ids["C1"], [ids["C2"].public], chunk_size=chunk_size)
    h = parse_header(BundleSource(blob))
    off, _ = h.chunk_span(h.num_chunks // 2)
    bad = bytearray(blob)
    bad[off + 5] ^= 0x40  # this chunk now fails GCM *and* the signature no longer matches
    _refused(bytes(bad), ids, SignatureError)
    with pytest.raises(SignatureError):
        verify(bytes(bad), ids["trust"])
    # the same damage under a fresh signature from the trusted sender: the chunk check catches it
    err = _refused(_resign(bytes(bad), ids["C1"]), ids, DecryptionError)
    assert f"chunk {h.num_chunks // 2} " in str(err)


def test_wrong_recipient_or_wrong_key_waits_for_the_signature(ids):
    ps = _ps(4, seed=2)
    for_c3 = seal(ps, ids["C1"], [ids["C3"].public], chunk_size=256)
    _refused(for_c3, ids, NotARecipientError)
    bad = bytearray(for_c3)
    bad[-SIGNATURE_SIZE - 3] ^= 1  # last chunk byte: signature broken too
    _refused(bytes(bad), ids, SignatureError)
    # a recipient entry naming C2's key but holding C3's wrapped key: the unwrap fails
    blob = seal(ps, ids["C1"], [ids["C2"].public], chunk_size=256)
    h = parse_header(BundleSource(blob))
    f = json.loads(h.raw)
    f["recipients"][0]["wrapped_key"] = json.loads(parse_header(BundleSource(for_c3)).raw)["recipients"][0]["wrapped_key"]
    raw = canonical_json(f)
    forged = encode_prefix(raw) + raw + blob[h.manifest_offset:]
    _refused(forged, ids, SignatureError)  # unwrap failed too, but the signature is checked first
    _refused(_resign(forged, ids["C1"]), ids, DecryptionError)


# ---------------------------------------------------------------------- hostile safetensors headers
def _tensor_blob(header: dict, data: bytes, pad: bool = True) -> bytes:
    hj = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        hj += b" " * (-len(hj) % 8)
    return struct.pack("<Q", len(hj)) + hj + data


def _hostile_parts(ps: PatchSet, tensors: bytes) -> list[PayloadPart]:
    slides = payload_parts(ps)[1]
    t = PayloadPart("tensors", "safetensors", len(tensors), lambda: iter([memoryview(tensors)]),
                    hashlib.sha256(tensors).hexdigest())
    return [t, slides]


def _good_header(ps: PatchSet) -> tuple[dict, bytes]:
    arrays = [("images", "U8", ps.images), ("labels", "I64", ps.labels.astype("<i8")),
              ("slide_index", "I32", ps.slide_index.astype("<i4"))]
    header, data, off = {}, b"", 0
    for name, code, a in arrays:
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        data += a.tobytes()
        off += a.nbytes
    return header, data


def _edits():
    def overlap(h, d):
        h["labels"]["data_offsets"] = [h["labels"]["data_offsets"][0] - 8, h["labels"]["data_offsets"][1] - 8]
        h["slide_index"]["data_offsets"][0] -= 8
        h["slide_index"]["shape"] = [h["slide_index"]["shape"][0] + 2]
        return h, d

    def wrong_dtype(h, d):
        h["labels"]["dtype"] = "I32"
        h["labels"]["data_offsets"][1] = h["labels"]["data_offsets"][0] + 4 * h["labels"]["shape"][0]
        return h, d

    def extra_tensor(h, d):
        end = h["slide_index"]["data_offsets"][1]
        h["extra"] = {"dtype": "U8", "shape": [4], "data_offsets": [end, end + 4]}
        return h, d + b"\x00" * 4

    def metadata(h, d):
        h["__metadata__"] = {"x": "y"}
        return h, d

    def gap(h, d):
        h["slide_index"]["data_offsets"] = [x + 4 for x in h["slide_index"]["data_offsets"]]
        return h, d + b"\x00" * 4

    def short_span(h, d):
        h["images"]["shape"][0] += 1
        return h, d

    def missing(h, d):
        del h["slide_index"]
        return h, d[:-4 * 4]

    def trailing_bytes(h, d):
        return h, d + b"\x00" * 8

    def bad_ndim(h, d):
        h["images"]["shape"] = [h["images"]["shape"][0], 16 * 16 * 3]
        return h, d

    return {"overlap": overlap, "wrong_dtype": wrong_dtype, "extra_tensor": extra_tensor, "metadata": metadata,
            "gap": gap, "short_span": short_span, "missing": missing, "trailing_bytes": trailing_bytes,
            "bad_ndim": bad_ndim}


@pytest.mark.parametrize("name", sorted(_edits()))
def test_hostile_safetensors_header_is_a_semantic_error(ids, name):
    ps = _ps(4, seed=4, coords=False)
    header, data = _good_header(ps)
    good = _sealed_with(_write_bundle, ps, ids["C1"], ids["C2"].public, 96, _hostile_parts(ps, _tensor_blob(header, data)))
    _same(ps, open_bundle(good, ids["C2"], ids["trust"], NO_LEDGER).patchset)  # the helper itself is sound
    h2, d2 = _edits()[name](json.loads(json.dumps(header)), data)
    blob = _sealed_with(_write_bundle, ps, ids["C1"], ids["C2"].public, 96, _hostile_parts(ps, _tensor_blob(h2, d2)))
    verify(blob, ids["trust"])  # validly signed by a trusted sender
    _refused(blob, ids, SemanticError)


@pytest.mark.parametrize("raw", [
    b"\xff" * 8 + b"{}",                                   # header length far past the part
    struct.pack("<Q", 4) + b"[1] ",                        # not an object
    struct.pack("<Q", 6) + b"{\"a\":",                     # not JSON
    struct.pack("<Q", 2) + b"\xc3(",                       # not UTF-8
    b"\x01\x02",                                           # shorter than the length field
])
def test_malformed_safetensors_bytes_are_semantic_errors(ids, raw):
    ps = _ps(4, seed=4, coords=False)
    blob = _sealed_with(_write_bundle, ps, ids["C1"], ids["C2"].public, 64, _hostile_parts(ps, raw))
    _refused(blob, ids, SemanticError)


def test_duplicate_tensor_key_is_a_semantic_error(ids):
    ps = _ps(4, seed=4, coords=False)
    header, data = _good_header(ps)
    hj = json.dumps(header, separators=(",", ":"))
    dup = hj[:-1] + "," + hj[1:hj.index(',"labels"')] + "}"  # "images" appears twice
    hb = dup.encode()
    blob = _sealed_with(_write_bundle, ps, ids["C1"], ids["C2"].public, 64,
                        _hostile_parts(ps, struct.pack("<Q", len(hb)) + hb + data))
    err = _refused(blob, ids, SemanticError)
    assert "duplicate" in str(err)


def test_writer_refuses_parts_that_disagree_with_their_sizes(ids):
    ps = _ps(3, seed=6)
    for delta in (-1, 1):
        parts = payload_parts(ps)
        parts[0].size += delta  # declared size no longer matches the bytes streamed
        with pytest.raises(FormatError, match="bytes"):
            _sealed_with(_write_bundle, ps, ids["C1"], ids["C2"].public, 64, parts)
