"""Attack: whoever can start a Flower run submits a modified app (FAB) to run code on a centre
(issue 14 item 1). The centre's SuperNode runs with ``--isolation process`` and its own ClientApp
launcher (``centre_node.app_guard``), which refuses an unapproved FAB before installing or
importing anything from it.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile

import pytest


@pytest.fixture(autouse=True)
def _flwr_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_fab_approval_rules(tmp_path):
    from histodd_fed.federation.app_trust import (SIGNATURE_FILE, AppTrust, UnapprovedAppError, check_fab,
                                                  fab_sha256, generate_app_key, sign_fab)

    _, pub = generate_app_key(tmp_path / "app.pem")
    _, other = generate_app_key(tmp_path / "other.pem")
    files = {"pyproject.toml": b"[project]\nname='x'\n", "pkg/app.py": b"print('hi')\n"}
    sig = json.dumps(sign_fab(_zip(files), tmp_path / "app.pem")).encode()
    good = _zip({**files, SIGNATURE_FILE: sig, ".info/CONTENT": b"whatever"})
    trust = AppTrust(keys={"k": pub})
    trust.keys = {__import__("histodd_fed.bundle.identity", fromlist=["key_id"]).key_id(pub): pub}
    assert "signed by" in check_fab(good, trust)
    refused = {
        "changed file": _zip({**files, "pkg/app.py": b"import os\n", SIGNATURE_FILE: sig}),
        "added file": _zip({**files, "pkg/evil.py": b"x=1\n", SIGNATURE_FILE: sig}),
        "unsigned": _zip(files),
        "unsafe path": _zip({**files, "../evil.py": b"x", SIGNATURE_FILE: sig}),
        "not a zip": b"PK\x03\x04 nonsense",
    }
    for what, fab in refused.items():
        with pytest.raises(UnapprovedAppError) as ei:
            check_fab(fab, trust)
        assert "\n" not in str(ei.value), what
    # signed by a key the centre does not pin
    foreign = AppTrust(keys={"x": other})
    foreign.keys = {__import__("histodd_fed.bundle.identity", fromlist=["key_id"]).key_id(other): other}
    with pytest.raises(UnapprovedAppError, match="does not trust"):
        check_fab(good, foreign)
    # a pinned hash approves exactly that FAB
    assert "pinned" in check_fab(_zip(files), AppTrust(digests={fab_sha256(_zip(files))}))


@pytest.mark.flower
def test_attack_modified_fab_is_refused_before_its_code_runs(tmp_path):
    """A run with a modified ClientApp (it writes a marker file when imported) is submitted through
    the real SuperLink; the centre's SuperNode refuses it and the marker is never written."""
    from coordinator.cli import run_config_for
    from histodd_fed.federation.coordinator import StudyConfig
    from histodd_fed.federation.deployment import Deployment
    from histodd_fed.federation.enrol import enrol

    (tmp_path / "d1").mkdir()
    cfgs, trust = enrol(tmp_path / "fed", {"C1": tmp_path / "d1"}, preset="tiny")
    marker = tmp_path / "MARKER-code-ran"
    cfg = StudyConfig(source="C1", target="C2", ipcs=[1], preset="tiny", study_dir=tmp_path / "study", trust=trust,
                      runtime="deployment", reply_timeout=90, identity_timeout=90, discovery_timeout=20)
    with Deployment(tmp_path / "dep") as dep:
        dep.start_superlink()
        app = dep.stage_app()
        dep.add_supernode("C1", cfgs[0].node_config_string())
        evil = tmp_path / "evil-app"
        shutil.copytree(app, evil)
        # the attacker's ClientApp: a new module that writes the marker when imported, then serves
        # the real handlers (so nothing else looks different)
        (evil / "evil_client.py").write_text(f"open({str(marker)!r}, 'w').write('attacker code ran')\n"
                                             "import centre_node.client_app as _c\napp = _c.app\n")
        pp = evil / "pyproject.toml"
        pp.write_text(pp.read_text().replace('clientapp = "centre_node.client_app:app"', 'clientapp = "evil_client:app"'))
        dep.run_app(run_config_for(cfg), timeout=400, app_dir=evil)
        logs = "".join(p.read_text(errors="replace") for p in (dep.root / "logs").glob("app-guard-*.log"))
    assert not marker.exists(), "the modified ClientApp's code ran on the centre"
    report = json.loads((cfg.study_dir / "report.json").read_text())
    faults = [f for f in report["faults"] if f["centre"].startswith("node") or f["centre"].startswith("?")
              or f["stage"] == "identity"]
    assert any("does not match its signature" in f["detail"] for f in faults), report["faults"]
    assert "UnapprovedAppError" in logs
