"""Seal/open roundtrips, multi-recipient, relay verification without private keys, large bundles."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from histodd_fed.bundle import (NO_LEDGER, FormatError, Ledger, NotARecipientError, OutputExistsError, TrustStore,
                                generate_identity, inspect, open_bundle, seal, verify)
from histodd_fed.bundle.seal import RECEIPT_FILE
from histodd_fed.patchset import PatchSet


@pytest.fixture()
def centres(tmp_path):
    ids = {c: generate_identity(c, tmp_path / c) for c in ("C1", "C2", "C3", "C4")}
    for me in ids:
        store = TrustStore.load(tmp_path / me)
        for other, ident in ids.items():
            if other != me:
                store.add(ident.public)
        store.save()
    return ids


def _same(a: PatchSet, b: PatchSet) -> None:
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.slide_index, b.slide_index)
    assert a.class_names == b.class_names and a.slide_ids == b.slide_ids and a.slide_labels == b.slide_labels
    assert a.kind == b.kind and a.meta == b.meta
    assert (a.coords is None) == (b.coords is None)
    if a.coords is not None:
        assert np.array_equal(a.coords, b.coords)


def test_roundtrip_per_slide_to_disk(centres, tmp_path, tiny_patchset):
    ps = tiny_patchset
    ps.kind, ps.meta = "synthetic", {"ipc": 6, "method": "histo-dd", "nested": {"lr": 0.01}}
    path = seal(ps, centres["C1"], [centres["C2"].public], out=tmp_path / "b.hdb",
                privacy_report={"risk": "low"}, extra_manifest={"note": "x"}, chunk_size=1000)
    assert path.exists() and not list(tmp_path.glob(".b.hdb.*"))
    h = inspect(path)
    assert h.source_centre == "C1" and h.recipient_centres == ["C2"] and h.num_chunks > 1
    out = tmp_path / "opened"
    ob = open_bundle(path, centres["C2"], TrustStore.load(tmp_path / "C2"), Ledger.in_key_dir(tmp_path / "C2"),
                     out_dir=out)
    _same(ps, ob.patchset)
    _same(ps, PatchSet.load(out))
    m = ob.manifest
    assert m["mode"] == "per-slide" and m["ipc"] == 6 and m["privacy_report"] == {"risk": "low"}
    assert m["class_counts"] == {"normal": 6, "tumour": 6} and m["extra"] == {"note": "x"}
    assert (out / RECEIPT_FILE).exists()
    with pytest.raises(OutputExistsError):
        open_bundle(path, centres["C2"], TrustStore.load(tmp_path / "C2"), NO_LEDGER, out_dir=out)


def test_roundtrip_patch_level_in_memory(centres, tmp_path):
    rng = np.random.default_rng(3)
    ps = PatchSet(images=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), labels=np.array([0, 1, 2] * 2),
                  class_names=["a", "b", "c"], kind="synthetic", meta={"seed": 3})
    blob = seal(ps, centres["C1"], [centres["C2"].public])
    assert isinstance(blob, bytes)
    ob = open_bundle(blob, centres["C2"], TrustStore.load(tmp_path / "C2"), NO_LEDGER)
    _same(ps, ob.patchset)
    assert ob.manifest["mode"] == "patch-level" and ob.manifest["ipc"] == 2
    assert ob.out_dir is None


def test_multi_recipient_and_third_party(centres, tmp_path, tiny_patchset):
    blob = seal(tiny_patchset, centres["C1"], [centres["C2"].public, centres["C3"].public])
    for c in ("C2", "C3"):
        ob = open_bundle(blob, centres[c], TrustStore.load(tmp_path / c), Ledger.in_key_dir(tmp_path / c))
        _same(tiny_patchset, ob.patchset)
    with pytest.raises(NotARecipientError, match="C4"):
        open_bundle(blob, centres["C4"], TrustStore.load(tmp_path / "C4"), NO_LEDGER)


def test_relay_verifies_without_private_keys(centres, tmp_path, tiny_patchset):
    relay = tmp_path / "coordinator"
    store = TrustStore.load(relay)
    for c in ("C1", "C2"):
        store.add(centres[c].public)
    store.save()
    assert sorted(p.name for p in relay.iterdir()) == ["trust.json"]
    blob = seal(tiny_patchset, centres["C1"], [centres["C2"].public])
    h = verify(blob, TrustStore.load(relay))
    assert h.sender == "C1" and [r["centre_id"] for r in h.recipients] == ["C2"]
    assert b"normal" not in blob and tiny_patchset.images.tobytes()[:64] not in blob


def test_bad_arguments(centres, tiny_patchset, tmp_path):
    with pytest.raises(FormatError):
        seal(tiny_patchset, centres["C1"], [])
    with pytest.raises(FormatError):
        seal(tiny_patchset, centres["C1"], [centres["C2"].public], chunk_size=8)
    with pytest.raises(FormatError, match="cannot open"):
        inspect(tmp_path / "missing.hdb")
    with pytest.raises(FormatError, match="too short"):
        inspect(b"")


def test_large_bundle_bounded_memory(centres, tmp_path):
    """A 50 MB payload seals from a memory-mapped patch set and opens, in 1 MiB chunks."""
    n = 50 * 1024 * 1024 // (64 * 64 * 3)
    rng = np.random.default_rng(0)
    big = PatchSet(images=rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8), labels=np.arange(n) % 2,
                   class_names=["n", "t"], kind="synthetic")
    big.save(tmp_path / "big")
    del big
    ps = PatchSet.load(tmp_path / "big", mmap=True)
    tracemalloc.start()
    try:
        path = seal(ps, centres["C1"], [centres["C2"].public], out=tmp_path / "big.hdb")
        seal_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        ob = open_bundle(path, centres["C2"], TrustStore.load(tmp_path / "C2"), NO_LEDGER, out_dir=tmp_path / "o")
        open_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    h = inspect(path)
    assert h.fields["payload_size"] > 50 * 1024 * 1024 and h.num_chunks == -(-h.fields["payload_size"] // (1 << 20)) == 51
    assert seal_peak < 16 * 1024 * 1024, f"seal peak {seal_peak / 1e6:.1f} MB"
    assert open_peak < ps.images.nbytes + 16 * 1024 * 1024, f"open peak {open_peak / 1e6:.1f} MB"
    assert np.array_equal(ob.patchset.images[::97], ps.images[::97])


def test_sealed_manifest_carries_a_loss_curve_summary_not_every_step(centres, tmp_path):
    """A 400-step DM run's per-step loss curve was ~52 KB of an ipc-10 bundle's ~117 KB (measured on
    the pcam-c17 hospitals benchmark): the sealed manifest keeps a 16-point summary; the sender's
    own set keeps the whole curve."""
    from histodd_fed.bundle.manifest import LOSS_CURVE_POINTS

    rng = np.random.default_rng(0)
    curve = [{"step": i, "stage": 0, "mean": 5.0 / (1 + i), "first": 5.0, "last": 4.0, "seconds": 0.05}
             for i in range(400)]
    ps = PatchSet(images=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), labels=np.arange(20) % 2,
                  class_names=["normal", "tumour"], kind="synthetic",
                  meta={"ipc": 10, "method": "dm", "loss_curve": curve})
    summary = seal(ps, centres["C1"], [centres["C2"].public], out=tmp_path / "s.hdb")
    whole = dict(ps.meta)
    ps_bare = PatchSet(images=ps.images, labels=ps.labels, class_names=ps.class_names, kind="synthetic",
                       meta={"ipc": 10, "method": "dm"})
    bare = seal(ps_bare, centres["C1"], [centres["C2"].public], out=tmp_path / "b.hdb")
    ob = open_bundle(summary, centres["C2"], TrustStore.load(tmp_path / "C2"), NO_LEDGER)
    meta = ob.manifest["distillation_config"]
    assert "loss_curve" not in meta and "loss_curve" not in ob.patchset.meta
    s = meta["loss_curve_summary"]
    assert s["steps"] == 400 and s["first"] == 5.0 and s["last"] == 5.0 / 400 and s["min"] == 5.0 / 400
    assert len(s["points"]) == LOSS_CURVE_POINTS and s["points"][0] == [0, 5.0] and s["points"][-1][0] == 399
    assert ps.meta == whole   # the sender's set is untouched
    # the summary costs well under 2 KB over a set with no curve at all (the whole curve: ~40 KB here)
    assert summary.stat().st_size - bare.stat().st_size < 2048
