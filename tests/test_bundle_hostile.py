"""Hostile-input battery: every mutated bundle is refused with the right error class, nothing written."""

from __future__ import annotations

import io
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from histodd_fed.bundle import (BundleError, DecryptionError, Ledger, ManifestHashError, NotARecipientError,
                                ReplayError, RevokedSignerError, SemanticError, TrustStore, UntrustedSignerError,
                                generate_identity, open_bundle, seal, verify)
from histodd_fed.bundle.errors import FormatError, SizeLimitError
from histodd_fed.bundle.hostile import Mutation, Mutator
from histodd_fed.bundle.manifest import build_manifest
from histodd_fed.bundle.payload import payload_parts
from histodd_fed.bundle.seal import _write_bundle
from histodd_fed.patchset import PatchSet


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """C1 sends to C2; C3 is a third centre; X is unknown to C2."""
    root = tmp_path_factory.mktemp("keys")
    ids = {c: generate_identity(c, root / c) for c in ("C1", "C2", "C3", "X")}
    for me, others in (("C2", ("C1", "C3")), ("C3", ("C1", "C2")), ("C1", ("C2", "C3"))):
        store = TrustStore.load(root / me)
        for o in others:
            store.add(ids[o].public)
        store.save()
    rng = np.random.default_rng(7)
    ps = PatchSet(images=rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8), labels=np.array([0, 1, 0, 1]),
                  class_names=["normal", "tumour"], kind="synthetic", meta={"ipc": 2, "seed": 7})
    blob = seal(ps, ids["C1"], [ids["C2"].public], chunk_size=256)
    return {"root": root, "ids": ids, "ps": ps, "blob": blob}


def _assert_refused(world, data: bytes, expected: tuple[type, ...], tmp_path: Path, label: str) -> None:
    c2 = world["ids"]["C2"]
    trust = TrustStore.load(world["root"] / "C2")
    ledger = Ledger(tmp_path / "ledger.json")
    out = tmp_path / "out"
    try:
        open_bundle(data, c2, trust, ledger, out_dir=out)
    except BundleError as exc:
        assert type(exc) in expected, f"{label}: raised {type(exc).__name__} ({exc}), expected {expected}"
        assert "\n" not in str(exc)
    else:
        pytest.fail(f"{label}: a mutated bundle opened")
    assert not out.exists(), f"{label}: partial output left behind"
    assert not ledger.path.exists(), f"{label}: ledger written on a failed open"
    assert [p.name for p in tmp_path.iterdir() if p.name != "ledger.json"] == [], f"{label}: temp files left"


def test_bit_flips_in_every_region(world, tmp_path):
    m = Mutator(world["blob"], sign=world["ids"]["C1"].sign)
    names = {r[0] for r in m.regions}
    assert {"magic", "version", "header_length", "header", "manifest", "chunk0", "signature"} <= names
    assert m.h.num_chunks >= 10
    count = 0
    for i, mu in enumerate(m.every_region(seed=1, per_region=8)):
        _assert_refused(world, mu.data, mu.expected, tmp_path, f"flip #{i} in {mu.region}")
        count += 1
    assert count == 8 * len(m.regions)


def test_bit_flips_in_a_version_1_bundle(world, tmp_path):
    """Version-1 bundles (no key commitment) are still read, and still refuse every mutation."""
    v1 = seal(world["ps"], world["ids"]["C1"], [world["ids"]["C2"].public], chunk_size=256, version=1)
    m = Mutator(v1, sign=world["ids"]["C1"].sign)
    assert m.h.version == 1
    for i, mu in enumerate(m.every_region(seed=3, per_region=3)):
        _assert_refused(world, mu.data, mu.expected, tmp_path, f"v1 flip #{i} in {mu.region}")
    for i, mu in enumerate(m.stream(seed=4, n=60)):
        _assert_refused(world, mu.data, mu.expected, tmp_path, f"v1 mutation #{i} {mu.kind}/{mu.region}")


def test_random_mutation_battery(world, tmp_path):
    m = Mutator(world["blob"], sign=world["ids"]["C1"].sign)
    kinds = set()
    for i, mu in enumerate(m.stream(seed=2024, n=400)):
        _assert_refused(world, mu.data, mu.expected, tmp_path, f"mutation #{i} {mu.kind}/{mu.region}")
        kinds.add(mu.kind)
    assert {"bitflip", "truncate", "append", "swap", "swap_resigned"} <= kinds
    assert kinds & {"downgrade", "huge_payload", "huge_chunk", "huge_manifest"}


@pytest.mark.parametrize("kind", ["truncate_all", "append", "swap", "swap_resigned", "drop_resigned", "headers"])
def test_named_mutations(world, tmp_path, kind):
    m = Mutator(world["blob"], sign=world["ids"]["C1"].sign)
    rng = np.random.default_rng(5)
    if kind == "truncate_all":  # every offset of the first 300 bytes, then a stride through the rest
        muts = [Mutation("truncate", "file", m.blob[:k], (FormatError,) if k < 14 else (SizeLimitError,))
                for k in list(range(0, 300)) + list(range(300, len(m.blob), 97))]
    elif kind == "append":
        muts = [m.append(rng) for _ in range(20)]
    elif kind == "swap":
        muts = [m.swap_chunks(rng) for _ in range(20)]
    elif kind == "swap_resigned":
        muts = [m.swap_chunks(rng, resign=True) for _ in range(20)]
    elif kind == "drop_resigned":
        muts = [m.drop_last_chunk_resigned()]
    else:
        muts = [m.header_edit(rng) for _ in range(60)]
    for i, mu in enumerate(muts):
        _assert_refused(world, mu.data, mu.expected, tmp_path, f"{kind} #{i} ({mu.kind})")


def test_resigned_swap_is_caught_by_chunk_binding(world, tmp_path):
    """A sender-signed bundle with reordered chunks passes the signature but fails the AEAD binding."""
    m = Mutator(world["blob"], sign=world["ids"]["C1"].sign)
    mu = m.swap_chunks(np.random.default_rng(0), resign=True)
    verify(mu.data, TrustStore.load(world["root"] / "C2"))  # signature is valid
    _assert_refused(world, mu.data, (DecryptionError,), tmp_path, "resigned swap")


def test_other_recipient_unknown_and_revoked_signers(world, tmp_path):
    ids, root = world["ids"], world["root"]
    for_c3 = seal(world["ps"], ids["C1"], [ids["C3"].public])
    _assert_refused(world, for_c3, (NotARecipientError,), tmp_path, "bundle for C3")
    from_x = seal(world["ps"], ids["X"], [ids["C2"].public])
    _assert_refused(world, from_x, (UntrustedSignerError,), tmp_path, "unknown signer")
    # C3 is trusted by C2 until revoked
    from_c3 = seal(world["ps"], ids["C3"], [ids["C2"].public])
    verify(from_c3, TrustStore.load(root / "C2"))
    store = TrustStore.load(root / "C2")
    store.remove("C3")
    store.save()
    try:
        _assert_refused(world, from_c3, (RevokedSignerError,), tmp_path, "revoked signer")
        with pytest.raises(RevokedSignerError):
            verify(from_c3, TrustStore.load(root / "C2"))
        with pytest.raises(RevokedSignerError):  # a revoked key cannot be trusted again
            store.add(ids["C3"].public)
    finally:
        store.revoked.clear()
        store.add(ids["C3"].public)
        store.save()


def test_replay_is_refused_after_one_open(world, tmp_path):
    ids, root = world["ids"], world["root"]
    blob = seal(world["ps"], ids["C1"], [ids["C2"].public])
    ledger = Ledger(tmp_path / "ledger.json")
    trust = TrustStore.load(root / "C2")
    first = open_bundle(blob, ids["C2"], trust, ledger, out_dir=tmp_path / "first")
    assert f"{first.header.sign_key_id}:{first.header.bundle_id}" in ledger.entries()
    with pytest.raises(ReplayError, match="already opened"):
        open_bundle(blob, ids["C2"], trust, ledger, out_dir=tmp_path / "second")
    assert not (tmp_path / "second").exists()
    # a failed open does not burn the id: a fresh ledger accepts it
    open_bundle(blob, ids["C2"], trust, Ledger(tmp_path / "other.json"))


def _hostile_sender_bundle(world, edit) -> bytes:
    """A bundle from trusted C1 whose manifest is edited before sealing (valid crypto, bad content)."""
    ps, sender = world["ps"], world["ids"]["C1"]
    parts = payload_parts(ps)
    bid, created = os.urandom(16).hex(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    m = build_manifest(ps, bid, sender, created, parts, None, None)
    edit(m)
    buf = io.BytesIO()
    _write_bundle(buf, sender, [world["ids"]["C2"].public], m, parts, bid, created, 256)
    return buf.getvalue()


@pytest.mark.parametrize("edit,expected", [
    (lambda m: m["payload_parts"][0].update(sha256="0" * 64), ManifestHashError),
    (lambda m: m["payload_parts"][1].update(sha256="f" * 64), ManifestHashError),
    (lambda m: m["payload_parts"][1].update(size=m["payload_parts"][1]["size"] - 1), ManifestHashError),
    (lambda m: m.update(distillation_config={"ipc": 3}), ManifestHashError),
    (lambda m: m.update(class_names=["only"], class_counts={"only": 4}), SemanticError),
    (lambda m: m.update(num_images=5), SemanticError),
    (lambda m: m.update(class_counts={"normal": 4, "tumour": 0}), SemanticError),
    (lambda m: m.update(image_shape=[32, 32, 3]), SemanticError),
    (lambda m: m.update(bundle_id="0" * 32), SemanticError),
    (lambda m: m.update(kind="weird"), SemanticError),
    (lambda m: m.pop("extra"), SemanticError),
])
def test_trusted_but_inconsistent_sender(world, tmp_path, edit, expected):
    _assert_refused(world, _hostile_sender_bundle(world, edit), (expected,), tmp_path, f"edit -> {expected.__name__}")
