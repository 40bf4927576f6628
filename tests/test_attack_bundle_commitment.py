"""Issue 14 item 9: AES-GCM is not key-committing.

Attack: a trusted but malicious sender (C1) seals ONE signed bundle for C2 and C3, wraps a
different content key for each, and crafts the manifest and every chunk so that each authenticates
under both keys (a two-key GCM collision: one free block per piece). The relay's signature check
passes and each recipient's AEAD checks pass, yet C2 and C3 decrypt different bytes. Format
version 2 signs a commitment to the content key in the header; a recipient whose unwrapped key
does not match it is refused before anything is decrypted. Version-1 bundles still open when
they have one recipient (one key: no split view); a multi-recipient version-1 bundle is refused.
"""

from __future__ import annotations

import base64
import json
import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from typer.testing import CliRunner

from centre_node.cli import app
from histodd_fed.bundle import (NO_LEDGER, KeyCommitmentError, Ledger, TrustStore, VersionError, generate_identity,
                                inspect, open_bundle, seal, verify)
from histodd_fed.bundle.format import BundleSource, key_commitment, parse_header
from histodd_fed.bundle.hostile import forge_split_key_bundle, gcm_two_key_ciphertext
from histodd_fed.bundle.format import MANIFEST_AAD, MANIFEST_NONCE
from histodd_fed.bundle.seal import _unwrap_key
from histodd_fed.patchset import PatchSet

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("commit")
    ids = {c: generate_identity(c, root / c) for c in ("C1", "C2", "C3")}
    for me in ("C2", "C3"):
        s = TrustStore.load(root / me)
        s.add(ids["C1"].public)
        s.save()
    rng = np.random.default_rng(0)
    ps = PatchSet(images=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8), labels=np.arange(6) % 2,
                  class_names=["normal", "tumour"], kind="synthetic", meta={"seed": 0})
    return root, ids, ps


def test_gcm_alone_authenticates_one_ciphertext_under_two_keys():
    k1, k2, nonce, aad = os.urandom(32), os.urandom(32), os.urandom(12), b"histodd"
    pt = b"the patches C2 is meant to see, padded to a few blocks....."
    ct = gcm_two_key_ciphertext(k1, k2, nonce, aad, AESGCM(k1).encrypt(nonce, pt, aad)[:-16], 0)
    assert AESGCM(k1).decrypt(nonce, ct, aad) != AESGCM(k2).decrypt(nonce, ct, aad)  # both authenticate


def test_attack_v1_one_signature_two_contents(world):
    """Against version 1 the split-key bundle passes signature and every AEAD check for C3."""
    root, ids, ps = world
    blob = forge_split_key_bundle(ps, ids["C1"], ids["C2"].public, ids["C3"].public, version=1)
    verify(blob, TrustStore.load(root / "C2"))  # the relay sees one valid signed bundle
    h = parse_header(BundleSource(blob))
    m = blob[h.manifest_offset:h.payload_offset]
    seen = [AESGCM(_unwrap_key(h, ids[c])).decrypt(MANIFEST_NONCE, m, MANIFEST_AAD + h.header_sha256)
            for c in ("C2", "C3")]
    assert seen[0] != seen[1]  # both authentic, different bytes: what v2 rules out
    # so a multi-recipient version-1 bundle is refused up front (a single recipient sees one key only)
    for c in ("C2", "C3"):
        with pytest.raises(VersionError, match="not key-committing"):
            open_bundle(blob, ids[c], TrustStore.load(root / c), NO_LEDGER)


def test_attack_v2_split_key_bundle_is_refused_before_decryption(world, tmp_path):
    root, ids, ps = world
    f = tmp_path / "split.hdb"
    f.write_bytes(forge_split_key_bundle(ps, ids["C1"], ids["C2"].public, ids["C3"].public, version=2))
    verify(f, TrustStore.load(root / "C3"))  # validly signed by trusted C1
    r = runner.invoke(app, ["open", str(f), "--keys", str(root / "C3"), "--out", str(tmp_path / "o")])
    assert type(r.exception) is KeyCommitmentError and "\n" not in str(r.exception), repr(r.exception)
    assert "commits" in str(r.exception)
    assert not (tmp_path / "o").exists() and Ledger.in_key_dir(root / "C3").entries() == {}  # no ledger entry


def test_v2_is_written_by_default_and_v1_still_opens(world):
    root, ids, ps = world
    v2 = seal(ps, ids["C1"], [ids["C2"].public, ids["C3"].public])
    h = inspect(v2)
    assert h.version == 2
    key = _unwrap_key(h, ids["C3"])
    assert base64.b64decode(h.fields["key_commitment"]) == key_commitment(key, h.bundle_id)
    v1 = seal(ps, ids["C1"], [ids["C2"].public], version=1)
    assert inspect(v1).version == 1 and "key_commitment" not in json.loads(inspect(v1).raw)
    for blob, c in ((v2, "C2"), (v2, "C3"), (v1, "C2")):
        ob = open_bundle(blob, ids[c], TrustStore.load(root / c), NO_LEDGER)
        assert np.array_equal(ob.patchset.images, ps.images)
