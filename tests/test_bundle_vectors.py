"""Issue 24 item 9: a bundle read from docs/bundle-format.md alone (test vectors in tests/vectors/).

``test_vectors_read_from_the_spec`` is a second reader: it uses only ``struct``, ``json`` (to parse),
``hashlib``/``hmac`` and the raw primitives of ``cryptography`` (Ed25519, RFC 9180 HPKE, AES-GCM) - no
helper of ``histodd_fed`` - and builds every signed or bound byte string (signature input, key
commitment, HPKE ``info``, AADs, nonces) from the spec's section "Byte strings, exactly". The
library must read the same vectors to the same plaintext digests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VEC = Path(__file__).parent / "vectors"
KEYS = json.loads((VEC / "bundle-v2-keys.json").read_text())
EXPECTED = json.loads((VEC / "bundle-v2-expected.json").read_text())
BLOB = (VEC / "bundle-v2.hdb").read_bytes()
SAFE = re.compile(r'^[\x20-\x7e]*$')


def _canon(v) -> bytes:
    """The spec's canonical encoding of header values: sorted keys (bytewise), no whitespace, strings
    verbatim in double quotes (their alphabet needs no escape), lists in order, integers in decimal."""
    if isinstance(v, dict):
        items = sorted(v.items(), key=lambda kv: kv[0].encode("ascii"))
        return b"{" + b",".join(_canon(k) + b":" + _canon(x) for k, x in items) + b"}"
    if isinstance(v, str):
        assert SAFE.match(v) and '"' not in v and "\\" not in v, v
        return b'"' + v.encode("ascii") + b'"'
    if isinstance(v, list):
        return b"[" + b",".join(_canon(x) for x in v) + b"]"
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v).encode("ascii")
    raise AssertionError(f"not a header value: {v!r}")


def test_vectors_read_from_the_spec():
    assert hashlib.sha256(BLOB).hexdigest() == EXPECTED["file_sha256"]
    # container
    magic, version, hlen = struct.unpack(">8sHI", BLOB[:14])
    assert magic == b"HDDBNDL\x00" and version == 2
    header_bytes = BLOB[14:14 + hlen]
    h = json.loads(header_bytes)
    assert _canon(h) == header_bytes  # the header is canonical: re-encoding it gives the same bytes
    m_off = 14 + hlen
    p_off = m_off + h["manifest_ciphertext_size"]
    s_off = p_off + h["payload_ciphertext_size"]
    assert s_off + 64 == len(BLOB)
    # signature: Ed25519 over domain || SHA-256(every byte before the signature)
    c1 = KEYS["C1"]
    assert h["source"] == {"centre": "C1", "sign_key_id": hashlib.sha256(bytes.fromhex(c1["sign_public"])).hexdigest()[:32]}
    ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(c1["sign_public"])).verify(
        BLOB[s_off:], b"histodd-bundle/v1/signature\x00" + hashlib.sha256(BLOB[:s_off]).digest())
    # key wrap: RFC 9180 base mode, DHKEM(X25519, HKDF-SHA256) 0x0020, HKDF-SHA256 0x0001, AES-256-GCM 0x0002,
    # single-shot, aad empty; ciphertext = enc || wrapped_key
    c2 = KEYS["C2"]
    (r,) = h["recipients"]
    assert r["centre"] == "C2" and r["kem_key_id"] == c2["kem_key_id"]
    fixed = {k: v for k, v in h.items() if k != "recipients"}
    fixed["format_version"] = version
    info = b"histodd-bundle/v1/key-wrap\x00" + _canon({"header": fixed, "recipient": {"centre": r["centre"],
                                                                                       "kem_key_id": r["kem_key_id"]}})
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    kem = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(c2["kem_private"]))
    key = suite.decrypt(base64.b64decode(r["enc"]) + base64.b64decode(r["wrapped_key"]), kem, info=info)
    assert len(key) == 32
    # key commitment: HMAC-SHA256(key, domain || the 32 ASCII hex digits of bundle_id)
    commit = hmac.new(key, b"histodd-bundle/v2/key-commitment\x00" + h["bundle_id"].encode("ascii"), "sha256").digest()
    assert commit == base64.b64decode(h["key_commitment"])
    # manifest and chunks
    aead = AESGCM(key)
    hh = hashlib.sha256(header_bytes).digest()
    manifest = aead.decrypt(b"\x00\x00\x00\x01" + bytes(8), BLOB[m_off:p_off], b"histodd-bundle/v1/manifest\x00" + hh)
    assert hashlib.sha256(manifest).hexdigest() == EXPECTED["manifest_plaintext_sha256"]
    payload, off, n = b"", p_off, h["num_chunks"]
    for i in range(n):
        size = min(h["chunk_size"], h["payload_size"] - i * h["chunk_size"]) + 16
        aad = b"histodd-bundle/v1/chunk\x00" + hh + struct.pack(">Q", i) + bytes([i == n - 1])
        payload += aead.decrypt(b"\x00\x00\x00\x00" + struct.pack(">Q", i), BLOB[off:off + size], aad)
        off += size
    assert off == s_off and len(payload) == h["payload_size"]
    m = json.loads(manifest)
    assert m["bundle_id"] == h["bundle_id"] and m["source_centre"] == "C1"
    for p in m["payload_parts"]:
        part = payload[p["offset"]:p["offset"] + p["size"]]
        assert hashlib.sha256(part).hexdigest() == p["sha256"] == EXPECTED["parts"][p["name"]]
    # tensors part: a safetensors file; images U8 (N,H,W,3)
    t = payload[:m["payload_parts"][0]["size"]]
    (tl,) = struct.unpack("<Q", t[:8])
    th = json.loads(t[8:8 + tl])
    a, b = th["images"]["data_offsets"]
    assert hashlib.sha256(t[8 + tl + a:8 + tl + b]).hexdigest() == EXPECTED["images_sha256"]
    slides = json.loads(payload[m["payload_parts"][1]["offset"]:])
    assert slides["slide_ids"] == EXPECTED["slide_ids"]


def test_the_library_reads_the_vectors():
    from histodd_fed.bundle import NO_LEDGER, Limits, TrustStore, open_bundle
    from histodd_fed.bundle.identity import Identity, PublicIdentity

    def ident(cid):
        k = KEYS[cid]
        sk = ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(k["sign_private"]))
        kk = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(k["kem_private"]))
        pub = PublicIdentity(cid, bytes.fromhex(k["sign_public"]), bytes.fromhex(k["kem_public"]))
        return Identity(public=pub, signing_key=sk, kem_private=kk)

    trust = TrustStore()
    trust.centres["C1"] = ident("C1").public
    got = open_bundle(BLOB, ident("C2"), trust, NO_LEDGER, limits=Limits(max_age_seconds=None))
    assert hashlib.sha256(np.ascontiguousarray(got.patchset.images).tobytes()).hexdigest() == EXPECTED["images_sha256"]
    assert [int(x) for x in got.patchset.labels] == EXPECTED["labels"]


@pytest.mark.parametrize("flip", ["bundle_id_as_raw_bytes", "format_version_outside_header"])
def test_the_readings_the_old_spec_allowed_fail(flip):
    """The readings a second implementation took from the earlier spec do not verify."""
    magic, version, hlen = struct.unpack(">8sHI", BLOB[:14])
    h = json.loads(BLOB[14:14 + hlen])
    (r,) = h["recipients"]
    kem = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(KEYS["C2"]["kem_private"]))
    fixed = {k: v for k, v in h.items() if k != "recipients"}
    rec = {"centre": r["centre"], "kem_key_id": r["kem_key_id"]}
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    ct = base64.b64decode(r["enc"]) + base64.b64decode(r["wrapped_key"])
    good_info = b"histodd-bundle/v1/key-wrap\x00" + _canon({"header": {**fixed, "format_version": version},
                                                            "recipient": rec})
    if flip == "format_version_outside_header":
        with pytest.raises(Exception):
            suite.decrypt(ct, kem, info=b"histodd-bundle/v1/key-wrap\x00" + _canon(
                {"format_version": version, "header": fixed, "recipient": rec}))
        return
    key = suite.decrypt(ct, kem, info=good_info)
    wrong = hmac.new(key, b"histodd-bundle/v2/key-commitment\x00" + bytes.fromhex(h["bundle_id"]), "sha256")
    assert wrong.digest() != base64.b64decode(h["key_commitment"])
