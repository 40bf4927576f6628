"""`centre-node export` runs the privacy gate with an audit required (--patches / --holdout)."""

from __future__ import annotations

import numpy as np
from typer.testing import CliRunner

from centre_node.cli import app
from histodd_fed.patchset import PatchSet
from histodd_fed.privacy.gate import PrivacyRiskError

runner = CliRunner()


def _keys(tmp_path):
    k = {c: tmp_path / f"keys-{c}" for c in ("C1", "C2")}
    for c, d in k.items():
        assert runner.invoke(app, ["keygen", "--centre-id", c, "--out", str(d), "--no-passphrase"]).exit_code == 0
    assert runner.invoke(app, ["trust", "add", str(k["C2"] / "identity.json"), "--keys", str(k["C1"])]).exit_code == 0
    return k


def _real(n: int = 40, seed: int = 0) -> PatchSet:
    rng = np.random.default_rng(seed)
    return PatchSet(images=rng.integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8),
                    labels=np.arange(n) % 2, class_names=["normal", "tumour"])


def test_export_requires_an_audit_and_blocks_copies(tmp_path):
    k = _keys(tmp_path)
    real = _real()
    real_dir = real.save(tmp_path / "real")
    copy = real.subset(np.arange(4), kind="synthetic")  # verbatim real patches: must be blocked
    copy.meta = {}
    syn_dir = copy.save(tmp_path / "syn")
    args = ["export", "--synthetic", str(syn_dir), "--to", "C2", "--keys", str(k["C1"])]
    # no reference given: the gate cannot audit, so it refuses (a path in the set's meta would not count)
    r = runner.invoke(app, args + ["--out", str(tmp_path / "a.hdb")])
    assert r.exit_code != 0 and isinstance(r.exception, PrivacyRiskError), r.output
    assert "no reference" in str(r.exception) and not (tmp_path / "a.hdb").exists()
    # audited against --patches: copies of real patches are blocked
    r = runner.invoke(app, args + ["--patches", str(real_dir), "--out", str(tmp_path / "b.hdb")])
    assert isinstance(r.exception, PrivacyRiskError) and not (tmp_path / "b.hdb").exists()
    # overridden: sealed, with the accepted risk and the audit in the manifest's privacy report
    r = runner.invoke(app, args + ["--patches", str(real_dir), "--accept-privacy-risk", "--out", str(tmp_path / "c.hdb")])
    assert r.exit_code == 0, r.output
    from histodd_fed.bundle import Ledger, load_identity, open_bundle
    from histodd_fed.bundle.trust import TrustStore

    assert runner.invoke(app, ["trust", "add", str(k["C1"] / "identity.json"), "--keys", str(k["C2"])]).exit_code == 0
    opened = open_bundle(tmp_path / "c.hdb", load_identity(k["C2"]), TrustStore.load(k["C2"]),
                         Ledger.in_key_dir(k["C2"]))
    rep = opened.manifest["privacy_report"]
    assert rep["accepted_risk"] is True and rep["gate"]["audited"] is True and rep["gate"]["reasons"]
    # a missing --patches path is bad input
    r = runner.invoke(app, args + ["--patches", str(tmp_path / "nope"), "--out", str(tmp_path / "d.hdb")])
    assert r.exit_code != 0 and "nope" in str(r.exception)
