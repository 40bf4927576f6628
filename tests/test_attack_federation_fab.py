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
from pathlib import Path

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


def consortium_release(tmp_path) -> Path:
    """The consortium's signed app release (its key kept in its own folder, away from the coordinator)."""
    from histodd_fed.federation.app_release import main

    key, release = tmp_path / "consortium" / "app-key.pem", tmp_path / "consortium-release"
    if not key.exists():
        main(["keygen", str(key)])
        main(["sign", "--key", str(key), "--out", str(release)])
    return release


def _stage(dep, tmp_path):
    """The consortium's signed release of the app, taken by the deployment."""
    return dep.use_release(consortium_release(tmp_path))


def _recipe_args(tmp_path, dep_dir, nodes) -> list[str]:
    """Arguments of examples/deploy/start.sh as the coordinator runs it: the consortium's signed
    release (examples/deploy/sign-app.sh, its key in the consortium's folder) is all it gets."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    key, release = tmp_path / "consortium" / "app-key.pem", tmp_path / "release"
    subprocess.run([str(repo / ".venv/bin/python"), "-m", "histodd_fed.federation.app_release", "keygen", str(key)],
                   check=True, cwd=repo, capture_output=True)
    subprocess.run(["bash", str(repo / "examples/deploy/sign-app.sh"), str(key), str(release)], check=True,
                   capture_output=True)
    return [str(dep_dir), str(nodes), str(release)]


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
        app = _stage(dep, tmp_path)
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


def _retarget_trigger(planted_stem: Path) -> str:
    """SQL the SuperLink's operator adds to its own database: every new run's ``fab_version`` is
    rewritten so that Flower's loader path ``apps/<pub>.<name>.<version>.<hash8>`` climbs out of the
    approved app's folder into ``<planted_stem>.<hash8>``."""
    ups = "/".join([".."] * 40)
    tail = str(planted_stem).lstrip("/").replace("'", "''")
    return ("CREATE TRIGGER retarget AFTER INSERT ON run BEGIN UPDATE run SET fab_version = "
            f"NEW.fab_version || '.' || substr(NEW.fab_hash, 1, 8) || '/{ups}/{tail}' "
            "WHERE run_id = NEW.run_id; END")


@pytest.mark.flower
def test_attack_run_metadata_points_the_loader_at_a_planted_app(tmp_path):
    """The SuperLink's operator submits the approved, signed app, but its database rewrites the run's
    ``fab_version`` (``<version>.<hash8>/../../../<planted folder>``). The centre's guard approves the
    FAB's bytes; Flower's loader then imports the ClientApp of a planted folder (any folder the
    attacker could write on the centre, e.g. a shared /tmp). The guard must bind the run's fab_id,
    fab_version and FAB hash to the approved bytes and refuse path parts."""
    import hashlib
    import sqlite3

    from coordinator.cli import run_config_for
    from histodd_fed.federation.coordinator import StudyConfig
    from histodd_fed.federation.deployment import Deployment
    from histodd_fed.federation.enrol import enrol

    (tmp_path / "d1").mkdir()
    cfgs, trust = enrol(tmp_path / "fed", {"C1": tmp_path / "d1"}, preset="tiny")
    marker = tmp_path / "MARKER-planted-code-ran"
    cfg = StudyConfig(source="C1", target="C2", ipcs=[1], preset="tiny", study_dir=tmp_path / "study", trust=trust,
                      runtime="deployment", reply_timeout=90, identity_timeout=90, discovery_timeout=20)
    with Deployment(tmp_path / "dep") as dep:
        dep.start_superlink()
        app = _stage(dep, tmp_path)
        h8 = hashlib.sha256(dep.build_fab(app)).hexdigest()[:8]
        planted = tmp_path / "shared-tmp" / f"planted.{h8}"
        planted.mkdir(parents=True)
        (planted / "pyproject.toml").write_text((app / "pyproject.toml").read_text().replace(
            'clientapp = "centre_node.client_app:app"', 'clientapp = "planted_client:app"'))
        (planted / "planted_client.py").write_text(f"open({str(marker)!r}, 'w').write('planted code ran')\n"
                                                   "import centre_node.client_app as _c\napp = _c.app\n")
        with sqlite3.connect(dep.root / "superlink.db") as con:
            con.execute(_retarget_trigger(planted.with_name("planted")))
        dep.add_supernode("C1", cfgs[0].node_config_string())
        dep.run_app(run_config_for(cfg), timeout=400)
        logs = "".join(p.read_text(errors="replace") for p in (dep.root / "logs").glob("app-guard-*.log"))
    assert not marker.exists(), "Flower imported a planted ClientApp after the guard approved the FAB"
    assert "UnapprovedAppError" in logs and "fab_version" in logs


def test_run_binding_rules(tmp_path):
    """The run must name exactly the approved FAB: hash, publisher/name, version; no path parts."""
    from histodd_fed.federation.app_trust import UnapprovedAppError, check_run_binding, fab_sha256

    pp = b'[project]\nname = "histodd-fed"\nversion = "0.1.0"\n[tool.flwr.app]\npublisher = "histodd-fed"\n'
    fab = _zip({"pyproject.toml": pp, "x.py": b"x = 1\n"})
    h = fab_sha256(fab)
    check_run_binding(fab, "histodd-fed/histodd-fed", "0.1.0", h)
    bad = {
        "hash": ("histodd-fed/histodd-fed", "0.1.0", "0" * 64),
        "id": ("histodd-fed/other", "0.1.0", h),
        "version": ("histodd-fed/histodd-fed", "0.2.0", h),
        "traversal": ("histodd-fed/histodd-fed", "0.1.0/../../x", h),
        "two slashes": ("histodd-fed/histodd-fed/x", "0.1.0", h),
    }
    for what, (fid, ver, hs) in bad.items():
        with pytest.raises(UnapprovedAppError) as ei:
            check_run_binding(fab, fid, ver, hs)
        assert "\n" not in str(ei.value), what
    evil = _zip({"pyproject.toml": pp.replace(b'"0.1.0"', b'"0.1.0/../../x"')})
    with pytest.raises(UnapprovedAppError, match="path"):
        check_run_binding(evil, "histodd-fed/histodd-fed", "0.1.0/../../x", fab_sha256(evil))


def _ed25519_keys_under(root: Path) -> list[Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    found = []
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.stat().st_size < 100_000 and b"PRIVATE KEY" in f.read_bytes():
            try:
                key = serialization.load_pem_private_key(f.read_bytes(), password=None)
            except (ValueError, TypeError):
                continue
            if isinstance(key, ed25519.Ed25519PrivateKey):
                found.append(f)
    return found


def _pinned_app_trusts(dep_dir: Path) -> list[Path]:
    """The app trust files the running guards were started with (their command lines)."""
    out = []
    for line in (dep_dir / "pids.txt").read_text().splitlines():
        pid, name = line.split()[:2]
        if name.startswith("app-guard-"):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            out.append(Path(argv[argv.index(b"--app-trust") + 1].decode()))
    return out


@pytest.mark.flower
def test_attack_coordinator_signs_its_own_app_with_the_recipe_key(tmp_path):
    """The coordinator runs the shipped recipe (examples/deploy/start.sh). Afterwards it searches
    everything the recipe wrote for the consortium's app-signing key, signs its own ClientApp with it
    and checks that app against the app trust each centre's guard pinned: accepted means it can run
    code on every centre. The recipe must take an app the consortium signed, never make the key."""
    import subprocess

    from histodd_fed.federation.app_trust import SIGNATURE_FILE, AppTrust, UnapprovedAppError, check_fab, sign_fab
    from histodd_fed.federation.enrol import enrol

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "d1").mkdir()
    cfgs, _ = enrol(tmp_path / "fed", {"C1": tmp_path / "d1"}, preset="tiny")
    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps([c.to_node_config() for c in cfgs]))
    dep = tmp_path / "coordinator-deploy"
    args = _recipe_args(tmp_path, dep, nodes)
    try:
        r = subprocess.run(["bash", str(repo / "examples/deploy/start.sh"), *args], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        pinned = _pinned_app_trusts(dep)
    finally:
        subprocess.run(["bash", str(repo / "examples/deploy/stop.sh"), str(dep)], capture_output=True, timeout=120)
    assert pinned, "no app guard was started"
    evil = {"pyproject.toml": b'[project]\nname = "histodd-fed"\nversion = "0.1.0"\n'
                              b'[tool.flwr.app]\npublisher = "histodd-fed"\n',
            "evil.py": b"import os\nos.system('id')\n"}
    accepted = []
    for key in _ed25519_keys_under(dep):
        signed = _zip({**evil, SIGNATURE_FILE: json.dumps(sign_fab(_zip(evil), key)).encode()})
        for trust in pinned:
            try:
                check_fab(signed, AppTrust.load(trust))
                accepted.append((key.name, trust.name))
            except UnapprovedAppError:
                pass
    assert not accepted, f"the coordinator signed its own app with a key the recipe left it: {accepted}"
