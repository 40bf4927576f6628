"""Regenerate tests/vectors/bundle-v2-* (run once; the committed files are the vectors).

Fixed keys (private bytes below), a fixed bundle id and time, a tiny per-slide patch set. HPKE's
ephemeral key is random, so re-running gives a different (equally valid) bundle: only re-run to
change the vectors on purpose. ``python tests/vectors/make_bundle_vectors.py``
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from histodd_fed.bundle.hostile import forge_bundle
from histodd_fed.bundle.identity import Identity, PublicIdentity, _raw_public
from histodd_fed.patchset import PatchSet

HERE = Path(__file__).parent
KEYS = {  # 32-byte private keys, hex (test vectors only: never use them)
    "C1": {"sign": "01" * 32, "kem": "02" * 32},
    "C2": {"sign": "03" * 32, "kem": "04" * 32},
}
BUNDLE_ID = "00112233445566778899aabbccddeeff"
CREATED = "2026-01-02T03:04:05+00:00"


def identity(cid: str) -> Identity:
    sk = ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(KEYS[cid]["sign"]))
    kk = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(KEYS[cid]["kem"]))
    pub = PublicIdentity(centre_id=cid, sign_public=_raw_public(sk), kem_public=_raw_public(kk), created=CREATED)
    return Identity(public=pub, signing_key=sk, kem_private=kk)


def main() -> None:
    c1, c2 = identity("C1"), identity("C2")
    rng = np.random.default_rng(7)
    ps = PatchSet(images=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), labels=np.array([0, 1, 0, 1, 0, 1]),
                  class_names=["normal", "tumour"], slide_index=np.array([0, 0, 0, 1, 1, 1]),
                  slide_ids=["s-a", "s-b"], slide_labels={"s-a": 0, "s-b": 1}, kind="synthetic",
                  meta={"seed": 0, "ipc": 3, "method": "dm"})
    blob = forge_bundle(ps, c1, [c2.public], bundle_id=BUNDLE_ID, created=CREATED, chunk_size=128)
    (HERE / "bundle-v2.hdb").write_bytes(blob)
    keys = {cid: {"centre_id": cid, "sign_private": v["sign"], "kem_private": v["kem"],
                  "sign_public": identity(cid).public.sign_public.hex(),
                  "kem_public": identity(cid).public.kem_public.hex(),
                  "sign_key_id": identity(cid).public.sign_key_id, "kem_key_id": identity(cid).public.kem_key_id}
            for cid, v in KEYS.items()}
    from histodd_fed.bundle import NO_LEDGER, Limits, TrustStore, open_bundle

    trust = TrustStore()
    trust.centres["C1"] = c1.public
    opened = open_bundle(blob, c2, trust, NO_LEDGER, limits=Limits(max_age_seconds=None))
    from histodd_fed.bundle.format import canonical_json

    expected = {
        "file_sha256": hashlib.sha256(blob).hexdigest(),
        "manifest_plaintext_sha256": hashlib.sha256(canonical_json(opened.manifest)).hexdigest(),
        "parts": {p["name"]: p["sha256"] for p in opened.manifest["payload_parts"]},
        "images_sha256": hashlib.sha256(np.ascontiguousarray(opened.patchset.images).tobytes()).hexdigest(),
        "labels": [int(x) for x in opened.patchset.labels],
        "slide_ids": list(opened.patchset.slide_ids),
    }
    (HERE / "bundle-v2-keys.json").write_text(json.dumps(keys, indent=2, sort_keys=True) + "\n")
    (HERE / "bundle-v2-expected.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
