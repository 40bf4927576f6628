"""`centre-node keygen / trust / export / inspect / verify / open` through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path
import stat

import pytest
from typer.testing import CliRunner

from centre_node.cli import app
from histodd_fed.privacy.gate import PrivacyRiskError
from histodd_fed.bundle import (KeyFileError, NotARecipientError, ReplayError, RevokedSignerError,
                                SignatureError, TrustConflictError, UntrustedSignerError)
from histodd_fed.patchset import PatchSet

runner = CliRunner()


def _ok(*args: str, env: dict | None = None) -> str:
    r = runner.invoke(app, [str(a) for a in args], env=env)
    assert r.exit_code == 0, f"{args}: {r.output} {r.exception!r}"
    return r.output


def _fails(exc: type, *args: str, env: dict | None = None) -> None:
    r = runner.invoke(app, [str(a) for a in args], env=env)
    assert r.exit_code != 0 and type(r.exception) is exc, f"{args}: {r.output} {r.exception!r}"


def test_cli_roundtrip(tmp_path, tiny_patchset):
    k = {c: tmp_path / f"keys-{c}" for c in ("C1", "C2", "C3")}
    env = {"PW": "s3cret"}
    _ok("keygen", "--centre-id", "C1", "--out", k["C1"], "--passphrase-env", "PW", "--scrypt-log2n", "10", env=env)
    assert "NOT encrypted" in _ok("keygen", "--centre-id", "C2", "--out", k["C2"])  # no terminal: a warning
    _ok("keygen", "--centre-id", "C3", "--out", k["C3"], "--no-passphrase")
    assert stat.S_IMODE((k["C1"] / "signing_key.pem").stat().st_mode) == 0o600
    _ok("trust", "add", k["C2"] / "identity.json", "--keys", k["C1"])
    _ok("trust", "add", k["C1"], "--keys", k["C2"])
    _ok("keygen", "--centre-id", "C1", "--out", tmp_path / "impostor", "--no-passphrase")  # another key claiming to be C1
    _fails(TrustConflictError, "trust", "add", tmp_path / "impostor", "--keys", k["C2"])
    listing = json.loads(_ok("trust", "list", "--keys", k["C2"], "--json"))
    assert [r["centre"] for r in listing["trusted"]] == ["C1"]

    real = tiny_patchset.save(tmp_path / "real")      # the centre's own reference for the gate
    tiny_patchset.kind = "synthetic"
    syn = tiny_patchset.save(tmp_path / "syn")
    bundle = tmp_path / "out.hdb"
    _fails(KeyFileError, "export", "--synthetic", syn, "--to", "C2", "--keys", k["C1"], "--out", bundle)  # no passphrase
    _fails(UntrustedSignerError, "export", "--synthetic", syn, "--to", "C9", "--keys", k["C1"], "--out", bundle,
           "--passphrase-env", "PW", env=env)
    # no reference: refused even with --accept-privacy-risk
    _fails(PrivacyRiskError, "export", "--synthetic", syn, "--to", "C2", "--keys", k["C1"], "--out", bundle,
           "--passphrase-env", "PW", "--accept-privacy-risk", env=env)
    assert not bundle.exists()
    out = _ok("export", "--synthetic", syn, "--patches", real, "--to", "C2", "--keys", k["C1"], "--out", bundle,
              "--passphrase-env", "PW", "--chunk-size", "512", "--accept-privacy-risk", env=env)
    assert "sealed 12 patches" in out and bundle.exists()

    assert "not checked" in _ok("inspect", bundle)
    info = json.loads(_ok("inspect", bundle, "--keys", k["C2"], "--json"))
    assert info["source_centre"] == "C1" and info["signature"]["valid"] is True
    info = json.loads(_ok("inspect", bundle, "--keys", k["C3"], "--json"))
    assert info["signature"]["valid"] is False and info["signature"]["error"] == "UntrustedSignerError"
    assert "OK" in _ok("verify", bundle, "--keys", k["C2"])
    _ok("trust", "add", k["C1"], "--keys", k["C3"])
    _fails(NotARecipientError, "open", bundle, "--keys", k["C3"], "--out", tmp_path / "x")
    assert not (tmp_path / "x").exists()

    opened = tmp_path / "opened"
    assert "12 patches" in _ok("open", bundle, "--keys", k["C2"], "--out", opened)
    assert PatchSet.load(opened).class_counts() == {"normal": 6, "tumour": 6}
    receipt = json.loads((opened / "bundle_receipt.json").read_text())
    assert receipt["manifest"]["extra"]["accepted_privacy_risk"] is True
    _fails(ReplayError, "open", bundle, "--keys", k["C2"], "--out", tmp_path / "again")

    data = bytearray(bundle.read_bytes())
    data[-10] ^= 0x01
    bad = tmp_path / "bad.hdb"
    bad.write_bytes(bytes(data))
    _fails(SignatureError, "verify", bad, "--keys", k["C2"])
    _ok("trust", "remove", "C1", "--keys", k["C2"])
    assert "revoked" in _ok("trust", "list", "--keys", k["C2"])
    _fails(RevokedSignerError, "verify", bundle, "--keys", k["C2"])


@pytest.mark.parametrize("argv", [["keygen", "--help"], ["rekey", "--help"], ["trust", "add", "--help"], ["export", "--help"],
                                  ["open", "--help"], ["inspect", "--help"], ["verify", "--help"]])
def test_cli_help(argv):
    assert "Usage" in _ok(*argv)


def test_default_passphrase_env_encrypts_and_unlocks_without_options(tmp_path):
    from histodd_fed.bundle import load_identity

    env = {"HISTODD_KEY_PASSPHRASE": "pw-from-env"}
    out = _ok("keygen", "--centre-id", "C7", "--out", tmp_path / "k", "--scrypt-log2n", "10", env=env)
    assert "NOT encrypted" not in out
    with pytest.raises(KeyFileError):
        load_identity(tmp_path / "k", "wrong")
    assert load_identity(tmp_path / "k", "pw-from-env").centre_id == "C7"
