"""Issue 14 item 4: replay-ledger poisoning.

Attack: a trusted but malicious centre (C3) reads the public bundle id of C1's genuine bundle for C2
(the relay sees it; `centre-node inspect` shows it), seals its own valid bundle under that id and
gets C2 to open it first. A ledger keyed by the bare bundle id would then refuse C1's genuine bundle
as a replay. The ledger is keyed by (signing key id, bundle id) and records the signed digest.
"""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from centre_node.cli import app
from histodd_fed.bundle import ReplayError, TrustStore, generate_identity, inspect, seal
from histodd_fed.bundle.hostile import forge_bundle
from histodd_fed.patchset import PatchSet

runner = CliRunner()


def _ps(seed: int) -> PatchSet:
    rng = np.random.default_rng(seed)
    return PatchSet(images=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), labels=np.array([0, 1, 0, 1]),
                    class_names=["normal", "tumour"], kind="synthetic", meta={"seed": seed})


def _world(tmp_path):
    ids = {c: generate_identity(c, tmp_path / c) for c in ("C1", "C2", "C3")}
    store = TrustStore.load(tmp_path / "C2")
    store.add(ids["C1"].public)
    store.add(ids["C3"].public)
    store.save()
    return ids


def test_attack_foreign_bundle_id_does_not_block_the_genuine_bundle(tmp_path):
    ids = _world(tmp_path)
    genuine = seal(_ps(1), ids["C1"], [ids["C2"].public], out=tmp_path / "genuine.hdb")
    stolen_id = json.loads(runner.invoke(app, ["inspect", str(genuine), "--json"]).output)["bundle_id"]
    # C3 seals its own (validly signed) bundle under C1's public bundle id
    poison = tmp_path / "poison.hdb"
    poison.write_bytes(forge_bundle(_ps(2), ids["C3"], [ids["C2"].public], bundle_id=stolen_id))
    assert inspect(poison).bundle_id == stolen_id
    r = runner.invoke(app, ["open", str(poison), "--keys", str(tmp_path / "C2"), "--out", str(tmp_path / "o3")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["open", str(genuine), "--keys", str(tmp_path / "C2"), "--out", str(tmp_path / "o1")])
    assert r.exit_code == 0, f"genuine bundle refused after poisoning: {r.exception!r}"
    assert (tmp_path / "o1" / "patchset.json").exists()
    ledger = json.loads((tmp_path / "C2" / "ledger.json").read_text())
    entries = list(ledger["opened"].values())
    assert sorted(e["sign_key_id"] for e in entries) == sorted([ids["C1"].public.sign_key_id,
                                                                ids["C3"].public.sign_key_id])
    assert all(len(e["digest"]) == 64 for e in entries)


def test_the_same_signer_replaying_its_own_id_is_still_refused(tmp_path):
    ids = _world(tmp_path)
    first = seal(_ps(1), ids["C1"], [ids["C2"].public], out=tmp_path / "a.hdb")
    again = tmp_path / "b.hdb"  # different content, same signer, same id: a replay of the id
    again.write_bytes(forge_bundle(_ps(3), ids["C1"], [ids["C2"].public], bundle_id=inspect(first).bundle_id))
    keys = str(tmp_path / "C2")
    assert runner.invoke(app, ["open", str(first), "--keys", keys, "--out", str(tmp_path / "o1")]).exit_code == 0
    r = runner.invoke(app, ["open", str(again), "--keys", keys, "--out", str(tmp_path / "o2")])
    assert type(r.exception) is ReplayError and "\n" not in str(r.exception)
    assert not (tmp_path / "o2").exists()
