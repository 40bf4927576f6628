"""Issue 24 item 2: silent replay after a wipe.

The replay ledger's state marker only guards against losing ``ledger.json`` alone: an attacker (or a
careless clean-up) that deletes ``ledger.json`` AND ``.ledger.json.state`` - or puts an empty ledger
in their place - lets a bundle that was already opened open again. The ledger's existence is anchored
in the identity (the passphrase-sealed key files bind ``replay_ledger: required``; for clear keys,
``identity.json``), the ledger is signed with the centre's key, and only an explicit, logged
``centre-node ledger reset`` starts a new one (refusing every bundle created before the reset).
All attacks below run as the attacker would: files and the real CLI.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from centre_node.cli import app
from histodd_fed.bundle import KeyFileError, ReplayError, TrustStore, load_identity, seal
from histodd_fed.bundle.hostile import forge_bundle
from histodd_fed.patchset import PatchSet

runner = CliRunner()
PW = {"HISTODD_TEST_PW": "correct horse battery staple"}


def _ps() -> PatchSet:
    rng = np.random.default_rng(0)
    return PatchSet(images=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), labels=np.array([0, 1, 0, 1]),
                    class_names=["normal", "tumour"], kind="synthetic", meta={"seed": 0})


def _cli(args, **kw):
    return runner.invoke(app, args, env=PW, **kw)


@pytest.fixture(params=["encrypted", "clear"])
def world(tmp_path, request):
    """C1 and C2 made with the real CLI; C2 trusts C1; C2 opens one bundle from C1."""
    pw = ["--passphrase-env", "HISTODD_TEST_PW", "--scrypt-log2n", "4"] if request.param == "encrypted" \
        else ["--no-passphrase"]
    for c in ("C1", "C2"):
        r = _cli(["keygen", "--centre-id", c, "--out", str(tmp_path / c), *pw])
        assert r.exit_code == 0, r.output
    assert _cli(["trust", "add", str(tmp_path / "C1"), "--keys", str(tmp_path / "C2")]).exit_code == 0
    unlock = {"passphrase_source": "env:HISTODD_TEST_PW", "env": PW} if request.param == "encrypted" else {}
    c1 = load_identity(tmp_path / "C1", **unlock)
    c2 = load_identity(tmp_path / "C2", **unlock)
    bundle = seal(_ps(), c1, [c2.public], out=tmp_path / "b.hdb")
    assert _open(tmp_path, bundle, "o1").exit_code == 0
    return tmp_path, c1, c2, bundle, request.param


def _open(tmp_path, bundle, out):
    extra = ["--passphrase-env", "HISTODD_TEST_PW"] if (tmp_path / "C2" / "signing_key.pem").read_bytes() \
        .startswith(b"-----BEGIN HISTODD") else []
    return _cli(["open", str(bundle), "--keys", str(tmp_path / "C2"), "--out", str(tmp_path / out), *extra])


def _wipe(keys):
    for name in ("ledger.json", ".ledger.json.state", ".ledger.json.lock"):
        if (keys / name).exists():
            os.unlink(keys / name)


def _refused(r, tmp_path, out, exc_type=KeyFileError):
    assert r.exit_code != 0 and isinstance(r.exception, exc_type), f"{r.output} {r.exception!r}"
    assert "\n" not in str(r.exception)
    assert not (tmp_path / out).exists()
    return str(r.exception)


def test_attack_delete_ledger_and_state_then_replay(world):
    tmp_path, c1, c2, bundle, _ = world
    _wipe(tmp_path / "C2")
    msg = _refused(_open(tmp_path, bundle, "o2"), tmp_path, "o2")
    assert "ledger.json" in msg and "vanished" in msg and "centre-node ledger reset" in msg, msg


def test_attack_replace_ledger_with_an_empty_one(world):
    tmp_path, c1, c2, bundle, _ = world
    keys = tmp_path / "C2"
    d = json.loads((keys / "ledger.json").read_text())
    _wipe(keys)
    d["opened"] = {}  # the attacker keeps every other field (format, version, even the old signature)
    (keys / "ledger.json").write_text(json.dumps(d))
    msg = _refused(_open(tmp_path, bundle, "o2"), tmp_path, "o2")
    assert "signature" in msg, msg
    d.pop("signature", None)
    (keys / "ledger.json").write_text(json.dumps(d))
    msg = _refused(_open(tmp_path, bundle, "o3"), tmp_path, "o3")
    assert "not signed" in msg, msg


def test_attack_drop_the_anchor_from_identity_json(world):
    tmp_path, c1, c2, bundle, kind = world
    if kind == "clear":
        pytest.skip("clear keys: whoever can edit the key folder can read the private keys (documented)")
    keys = tmp_path / "C2"
    ident = json.loads((keys / "identity.json").read_text())
    ident.pop("replay_ledger", None)
    (keys / "identity.json").write_text(json.dumps(ident))
    _wipe(keys)
    msg = _refused(_open(tmp_path, bundle, "o2"), tmp_path, "o2")
    assert "vanished" in msg, msg
    # nor can the sealed key file be edited to drop it: the envelope's fields are authenticated
    pem = (keys / "kem_key.pem").read_bytes().decode()
    lines = pem.split("\n")
    body = json.loads(lines[1])
    body.pop("replay_ledger", None)
    body["format_version"] = 1
    lines[1] = json.dumps(body, sort_keys=True, separators=(",", ":"))
    (keys / "kem_key.pem").write_text("\n".join(lines))
    msg = _refused(_open(tmp_path, bundle, "o3"), tmp_path, "o3")
    assert "kem_key.pem" in msg, msg


def test_explicit_reset_is_logged_and_refuses_everything_sealed_before_it(world):
    tmp_path, c1, c2, bundle, kind = world
    keys = tmp_path / "C2"
    _wipe(keys)  # a real disaster: the disk holding the ledger is lost
    extra = ["--passphrase-env", "HISTODD_TEST_PW"] if kind == "encrypted" else []
    r = _cli(["ledger", "reset", "--keys", str(keys), *extra])
    assert r.exit_code != 0  # --reason is required
    r = _cli(["ledger", "reset", "--keys", str(keys), "--reason", "disk lost 2026-05-01", *extra])
    assert r.exit_code == 0, r.output
    assert "reset" in r.output and "disk lost" in r.output
    log = [json.loads(x) for x in (keys / "ledger-resets.log").read_text().splitlines()]
    assert log[-1]["reason"] == "disk lost 2026-05-01" and log[-1]["previous"] == "missing"
    msg = _refused(_open(tmp_path, bundle, "o2"), tmp_path, "o2", ReplayError)  # the old bundle stays refused
    assert "reset" in msg, msg
    fresh = tmp_path / "fresh.hdb"
    from datetime import datetime, timedelta, timezone
    later = (datetime.now(timezone.utc) + timedelta(seconds=2)).isoformat(timespec="seconds")
    fresh.write_bytes(forge_bundle(_ps(), c1, [c2.public], created=later))
    assert _open(tmp_path, fresh, "o3").exit_code == 0
    assert _refused(_open(tmp_path, fresh, "o4"), tmp_path, "o4", ReplayError)


def test_reset_needs_the_keys(world):
    tmp_path, c1, c2, bundle, kind = world
    if kind == "clear":
        pytest.skip("clear keys need no passphrase")
    _wipe(tmp_path / "C2")
    r = runner.invoke(app, ["ledger", "reset", "--keys", str(tmp_path / "C2"), "--reason", "x",
                            "--passphrase-env", "WRONG"], env={"WRONG": "nope"})
    assert isinstance(r.exception, KeyFileError)
    assert not (tmp_path / "C2" / "ledger.json").exists()


def test_trust_store_still_loads_after_keygen(world):
    tmp_path, *_ = world
    assert "C1" in TrustStore.load(tmp_path / "C2")


def test_legacy_keys_are_anchored_by_rekey(tmp_path):
    """Key dirs from before the anchor (envelope version 1, no identity.json field) keep the marker-only
    behaviour until `centre-node rekey`, which anchors them and adopts (signs) their ledger."""
    from histodd_fed.bundle import Ledger, generate_identity
    from histodd_fed.bundle.identity import encrypt_key_file

    keys = tmp_path / "old"
    ident = generate_identity("C9", keys)
    pw = b"pw"
    for name, k in (("signing_key.pem", ident.signing_key), ("kem_key.pem", ident.kem_private)):
        (keys / name).write_bytes(encrypt_key_file(k, pw, scrypt_log2n=4, replay_ledger=False))
    (keys / "identity.json").write_text(json.dumps(ident.public.to_dict()))
    _wipe(keys)
    old = load_identity(keys, pw)
    assert old.replay_ledger is False
    Ledger(keys / "ledger.json").record("a" * 32, "b" * 32, "c" * 64, {"source": "C1"})  # an unsigned legacy ledger
    from histodd_fed.bundle import rekey_identity

    new = rekey_identity(keys, pw, b"pw2", scrypt_log2n=4)
    assert new.replay_ledger and load_identity(keys, b"pw2").replay_ledger
    assert len(Ledger.in_key_dir(keys).bound(new).entries()) == 1  # adopted, now signed
    _wipe(keys)
    with pytest.raises(KeyFileError, match="vanished"):
        Ledger.in_key_dir(keys).bound(load_identity(keys, b"pw2")).check("a" * 32, "d" * 32)
