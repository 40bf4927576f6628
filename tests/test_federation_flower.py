"""The study through real Flower runtimes: simulation (Ray) and deployment (TLS + node auth)."""

import os
from pathlib import Path

import pytest

from test_attack_federation_fab import consortium_release
from test_federation_study import _centres, _study


@pytest.fixture(autouse=True)
def _flwr_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")


@pytest.mark.flower
def test_simulation_runtime_full_transfer(tmp_path):
    from coordinator.server_app import run_simulation_study

    cfgs, trust = _centres(tmp_path)
    cfg = _study(tmp_path, trust, runtime="simulation", discovery_timeout=60)
    out = run_simulation_study(cfg, [c.to_node_config() for c in cfgs])
    assert not out.faults, [f.line() for f in out.faults]
    assert out.messages == {"identity": 2, "distil": 1, "train": 1}
    assert sorted(r["mode"] for r in out.rows) == ["full", "none"]


@pytest.mark.flower
@pytest.mark.slow
def test_deployment_tls_auth_full_transfer(tmp_path, monkeypatch):
    from coordinator.cli import run_config_for
    from histodd_fed.federation.deployment import Deployment

    # centre keys encrypted at rest (scrypt); each SuperNode's ClientApp unlocks them from its env
    monkeypatch.setenv("HISTODD_KEY_PASSPHRASE", "correct horse battery staple")
    cfgs, trust = _centres(tmp_path, key_passphrase="env:HISTODD_KEY_PASSPHRASE")
    assert b"ENCRYPTED" in (cfgs[0].key_dir / "signing_key.pem").read_bytes() or \
        b"scrypt" in (cfgs[0].key_dir / "signing_key.pem").read_bytes()
    cfg = _study(tmp_path, trust, runtime="deployment", reply_timeout=240, discovery_timeout=60)
    with Deployment(tmp_path / "dep") as dep:
        dep.start_superlink()
        dep.use_release(consortium_release(tmp_path))  # signed by the consortium; each centre's guard pins it
        for c in cfgs:  # SuperNodes in process isolation, each with its app guard; centre policies on
            assert "export-real" in c.node_config_string()
            dep.add_supernode(c.centre_id, c.node_config_string())
        dep.run_app(run_config_for(cfg), timeout=900)
        pids = [p.pid for p in dep.procs]
        guard_logs = "".join(p.read_text(errors="replace") for p in (dep.root / "logs").glob("app-guard-*.log"))
    for pid in pids:  # all stopped
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    import json

    report = json.loads((cfg.study_dir / "report.json").read_text())
    assert not report["faults"], report["faults"]
    assert sorted(r["transfer"] for r in report["rows"]) == ["Full", "no transfer"]
    assert "signed by app key" in guard_logs  # every ClientApp ran only after the FAB check
    assert {a["action"] for a in report["attestations"]} == {"identity", "distil", "train"}
