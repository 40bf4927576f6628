"""Issue 24 item 3: files an unprivileged local user can change.

Attacks, as another local account would run them: (a) ``trust.json`` left 0666 - the attacker adds
its own centre and the node verifies and opens the attacker's bundle; (b) the key folder 0777 with a
0600 ``trust.json`` - the attacker renames its own trust store over it (a writable folder lets
anyone replace the files in it); (c) ``app-trust.json`` 0666 - the attacker pins its own app key
and the app guard approves the attacker's FAB. Each must be refused with one line naming the file
and the chmod to run.
"""

from __future__ import annotations

import base64
import io
import json
import os
import zipfile

import numpy as np
import pytest
from histodd_fed.bundle import KeyPermissionError, TrustStore, generate_identity, seal
from histodd_fed.patchset import PatchSet

def _ps() -> PatchSet:
    rng = np.random.default_rng(0)
    return PatchSet(images=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), labels=np.array([0, 1, 0, 1]),
                    class_names=["normal", "tumour"], kind="synthetic", meta={"seed": 0})


@pytest.fixture()
def victim(tmp_path):
    """C2 trusts C1; the attacker (another local user) controls centre key EVIL."""
    c1, c2 = generate_identity("C1", tmp_path / "C1"), generate_identity("C2", tmp_path / "C2")
    evil = generate_identity("EVIL", tmp_path / "attacker")
    store = TrustStore.load(tmp_path / "C2")
    store.add(c1.public)
    store.save()
    bundle = seal(_ps(), evil, [c2.public], out=tmp_path / "evil.hdb")
    return tmp_path, evil, bundle


def _refused_with_chmod(r, path, mode: str):
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert "\n" not in line and str(path) in line and f"chmod {mode} {path}" in line, line
    return line


def test_attack_world_writable_trust_json(victim):
    tmp_path, evil, bundle = victim
    trust = tmp_path / "C2" / "trust.json"
    os.chmod(trust, 0o666)
    # the attacker, as another user, adds itself to the writable trust store
    d = json.loads(trust.read_text())
    d["centres"]["EVIL"] = {"identity": evil.public.to_dict(), "added": "2026-01-01T00:00:00+00:00"}
    trust.write_text(json.dumps(d))
    for args in (["verify", str(bundle), "--keys", str(tmp_path / "C2")],
                 ["open", str(bundle), "--keys", str(tmp_path / "C2"), "--out", str(tmp_path / "o")],
                 ["trust", "list", "--keys", str(tmp_path / "C2")]):
        line = _refused_with_chmod(_cli(args), trust, "600")
        assert "writable by group/others" in line and "0666" in line, line
    assert not (tmp_path / "o").exists()


def test_attack_world_writable_key_folder(victim):
    tmp_path, evil, bundle = victim
    keys = tmp_path / "C2"
    os.chmod(keys, 0o777)
    # trust.json itself is 0600, but the folder lets anyone replace it: rename a planted store over it
    planted = TrustStore(path=tmp_path / "planted.json")
    planted.add(evil.public)
    planted.save()
    os.replace(tmp_path / "planted.json", keys / "trust.json")
    for args in (["verify", str(bundle), "--keys", str(keys)],
                 ["open", str(bundle), "--keys", str(keys), "--out", str(tmp_path / "o")]):
        line = _refused_with_chmod(_cli(args), keys, "700")
        assert "0777" in line, line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mode", [0o620, 0o602])
def test_attack_group_or_other_writable_trust_json_api(victim, mode):
    tmp_path, _, _ = victim
    os.chmod(tmp_path / "C2" / "trust.json", mode)
    with pytest.raises(KeyPermissionError, match="chmod 600"):
        TrustStore.load(tmp_path / "C2")


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("target", ["file", "folder"])
def test_attack_writable_app_trust_lets_another_user_approve_its_app(tmp_path, target):
    from histodd_fed.errors import ConfigError
    from histodd_fed.federation.app_trust import SIGNATURE_FILE, AppTrust, check_fab, generate_app_key, sign_fab

    centre = tmp_path / "centre"
    centre.mkdir(mode=0o700)
    _, consortium = generate_app_key(tmp_path / "consortium.pem")
    AppTrust(keys={"k": consortium}).save(centre / "app-trust.json")
    os.chmod(centre / "app-trust.json", 0o644)
    AppTrust.load(centre / "app-trust.json")  # a sane file loads
    # the attacker pins its own app key in the writable file and signs its own app
    _, mine = generate_app_key(tmp_path / "attacker.pem")
    evil = {"pyproject.toml": b"[project]\nname='x'\n", "pkg/app.py": b"import os; os.system('id')\n"}
    fab = _zip({**evil, SIGNATURE_FILE: json.dumps(sign_fab(_zip(evil), tmp_path / "attacker.pem")).encode()})
    path = centre / "app-trust.json"
    if target == "file":
        os.chmod(path, 0o666)
        d = json.loads(path.read_text())
        d["keys"].append(base64.b64encode(mine).decode())
        path.write_text(json.dumps(d))
        bad, chmod = path, f"chmod 600 {path}"
    else:
        os.chmod(centre, 0o777)
        planted = tmp_path / "planted.json"
        AppTrust(keys={"m": mine}).save(planted)
        os.replace(planted, path)
        bad, chmod = centre, f"chmod 700 {centre}"
    with pytest.raises(ConfigError) as ei:
        check_fab(fab, AppTrust.load(path))
    msg = str(ei.value)
    assert "\n" not in msg and str(bad) in msg and chmod in msg, msg


def _cli(args):
    """Run the real CLI entry (``centre_node.cli.main``: one-line error, exit 2)."""
    import subprocess
    import sys

    code = "import sys; from centre_node.cli import main; sys.argv = ['centre-node'] + sys.argv[1:]; main()"
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)

    class R:
        exit_code = p.returncode
        output = p.stderr + p.stdout
        exception = None
    return R()
