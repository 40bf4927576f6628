"""Issue 14 item 8: no work before the signature.

Attack: anyone holding C2's *public* key can make a valid HPKE wrap (base mode), so an outsider can
forge a bundle that claims a trusted sender, wraps a real content key for C2 and encrypts a large
payload, with a junk signature. The reader must verify the Ed25519 signature over header and
ciphertext in a hash-only pass first: no payload-sized buffer, no unwrap, no decryption before it.
"""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
from typer.testing import CliRunner

from centre_node.cli import app
from histodd_fed.bundle import Ledger, SignatureError, TrustStore, generate_identity
from histodd_fed.bundle.hostile import forge_bundle
from histodd_fed.patchset import PatchSet

runner = CliRunner()


class _Outsider:
    """Claims to be C1 (its public identity is public) but holds no private key."""

    def __init__(self, pub):
        self.public, self.centre_id = pub, pub.centre_id

    def sign(self, message: bytes) -> bytes:
        return os.urandom(64)


def test_attack_forged_bundle_costs_no_payload_memory(tmp_path):
    ids = {c: generate_identity(c, tmp_path / c) for c in ("C1", "C2")}
    store = TrustStore.load(tmp_path / "C2")
    store.add(ids["C1"].public)
    store.save()
    n = 24 * 1024 * 1024 // (64 * 64 * 3)
    ps = PatchSet(images=np.zeros((n, 64, 64, 3), np.uint8), labels=np.arange(n) % 2,
                  class_names=["a", "b"], kind="synthetic")
    forged = tmp_path / "forged.hdb"
    forged.write_bytes(forge_bundle(ps, _Outsider(ids["C1"].public), [ids["C2"].public], chunk_size=1 << 20))
    del ps
    tracemalloc.start()
    try:
        r = runner.invoke(app, ["open", str(forged), "--keys", str(tmp_path / "C2"), "--out", str(tmp_path / "o")])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert type(r.exception) is SignatureError and "\n" not in str(r.exception), repr(r.exception)
    assert not (tmp_path / "o").exists() and Ledger.in_key_dir(tmp_path / "C2").entries() == {}  # no ledger entry
    assert peak < 8 * 1024 * 1024, f"{peak / 1e6:.1f} MB allocated before the signature failed"
