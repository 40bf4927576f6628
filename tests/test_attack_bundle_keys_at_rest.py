"""Issue 14 item 6: private keys at rest.

Attacks: (a) steal an encrypted key file and guess passphrases offline (PBKDF2 with 2,048
iterations made each guess cost about a millisecond); (b) a key file left readable by group/others
(another local account copies it) must stop the node, with the ``chmod`` to run. Also: the passphrase
reaches the node from a prompt, a file descriptor or an environment variable (never argv), a
SuperNode unlocks its key at start from a passphrase source, and old PBKDF2 key files still load.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from centre_node.cli import app
from histodd_fed.bundle import KeyFileError, generate_identity, load_identity
from histodd_fed.bundle.identity import KEM_KEY_FILE, SIGNING_KEY_FILE

runner = CliRunner()
CHEAP = 10  # log2 scrypt n for fast tests; recorded in the key file


def _guess(path, word: str) -> bool:
    """An attacker's single offline guess against a stolen key file (any format this code writes)."""
    from histodd_fed.bundle.identity import decrypt_key_file

    try:
        decrypt_key_file(path.read_bytes(), word.encode())
        return True
    except Exception:  # noqa: BLE001 - a wrong guess
        return False


def test_attack_offline_guessing_is_expensive(tmp_path):
    r = runner.invoke(app, ["keygen", "--centre-id", "C1", "--out", str(tmp_path / "k"), "--passphrase-env", "PW"],
                      env={"PW": "tulip"})
    assert r.exit_code == 0, r.output
    stolen = tmp_path / "k" / SIGNING_KEY_FILE
    head = json.loads(stolen.read_text().split("\n", 2)[1] if stolen.read_text().startswith("-----") else stolen.read_text())
    assert head["kdf"]["name"] == "scrypt" and head["kdf"]["n"] >= 2 ** 17 and head["kdf"]["r"] >= 8
    t = time.perf_counter()
    assert not _guess(stolen, "rose")
    per_guess = time.perf_counter() - t
    assert per_guess > 0.05, f"one offline guess costs only {per_guess * 1e3:.1f} ms"
    # and the right passphrase does unlock it (same code path the node uses)
    assert load_identity(tmp_path / "k", passphrase_source="env:PW", env={"PW": "tulip"}).centre_id == "C1"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_attack_group_or_world_readable_key_stops_the_node(tmp_path, mode):
    generate_identity("C2", tmp_path / "k")
    key = tmp_path / "k" / KEM_KEY_FILE
    os.chmod(key, mode)
    r = runner.invoke(app, ["open", str(tmp_path / "nothing.hdb"), "--keys", str(tmp_path / "k"),
                            "--out", str(tmp_path / "o")])
    assert isinstance(r.exception, KeyFileError), repr(r.exception)
    msg = str(r.exception)
    assert "\n" not in msg and str(key) in msg and f"chmod 600 {key}" in msg
    assert not (tmp_path / "o").exists()


def test_passphrase_sources_prompt_fd_env(tmp_path):
    env = {"PW": "correct horse"}
    r = runner.invoke(app, ["keygen", "--centre-id", "C1", "--out", str(tmp_path / "k"), "--passphrase-env", "PW",
                            "--scrypt-log2n", str(CHEAP)], env=env)
    assert r.exit_code == 0, r.output
    assert "ENCRYPTED" in (tmp_path / "k" / SIGNING_KEY_FILE).read_text()
    ident = load_identity(tmp_path / "k", passphrase_source="env:PW", env=env)
    # a prompt (typer's hidden input) when the keys are encrypted and no option names a source
    generate_identity("C2", tmp_path / "k2", passphrase="s3cret", scrypt_log2n=CHEAP)
    r = runner.invoke(app, ["open", str(tmp_path / "none.hdb"), "--keys", str(tmp_path / "k2"), "--out",
                            str(tmp_path / "o")], input="s3cret\n")
    assert "Passphrase for" in r.output and "cannot open bundle" in str(r.exception)  # unlocked, then no file
    r = runner.invoke(app, ["open", str(tmp_path / "none.hdb"), "--keys", str(tmp_path / "k2"), "--out",
                            str(tmp_path / "o")])
    assert isinstance(r.exception, KeyFileError) and "--passphrase-env" in str(r.exception)
    # a file descriptor (a pipe from the parent; the passphrase is never on the command line)
    rfd, wfd = os.pipe()
    os.write(wfd, b"correct horse\n")
    os.close(wfd)
    try:
        assert load_identity(tmp_path / "k", passphrase_source=f"fd:{rfd}").public == ident.public
    finally:
        os.close(rfd)
    # a file (mode 0600 only)
    pw = tmp_path / "pw.txt"
    pw.write_text("correct horse\n")
    os.chmod(pw, 0o600)
    assert load_identity(tmp_path / "k", passphrase_source=f"file:{pw}").public == ident.public
    os.chmod(pw, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_identity(tmp_path / "k", passphrase_source=f"file:{pw}")
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        load_identity(tmp_path / "k", passphrase="nope")
    with pytest.raises(KeyFileError, match="passphrase-protected"):
        load_identity(tmp_path / "k")
    with pytest.raises(KeyFileError, match="not set"):
        load_identity(tmp_path / "k", passphrase_source="env:NOPE", env={})
    # --no-passphrase is the explicit way to write clear keys
    r = runner.invoke(app, ["keygen", "--centre-id", "C3", "--out", str(tmp_path / "k3"), "--no-passphrase"])
    assert r.exit_code == 0 and load_identity(tmp_path / "k3").centre_id == "C3"


def test_passphrase_fd_through_the_real_cli(tmp_path):
    """`centre-node --passphrase-fd N` in a real process (a pipe inherited by the child)."""
    generate_identity("C1", tmp_path / "k", passphrase="pipe-pw", scrypt_log2n=CHEAP)
    rfd, wfd = os.pipe()
    os.write(wfd, b"pipe-pw\n")
    os.close(wfd)
    exe = os.path.join(os.path.dirname(sys.executable), "centre-node")
    try:
        p = subprocess.run([exe, "rekey", "--keys", str(tmp_path / "k"), "--passphrase-fd", str(rfd),
                            "--new-passphrase-env", "NEWPW", "--scrypt-log2n", str(CHEAP)],
                           pass_fds=(rfd,), capture_output=True, text=True, timeout=120,
                           env={**os.environ, "NEWPW": "new-pw"})
    finally:
        os.close(rfd)
    assert p.returncode == 0, p.stderr + p.stdout
    assert load_identity(tmp_path / "k", passphrase="new-pw").centre_id == "C1"


def test_legacy_pbkdf2_key_files_still_load_and_migrate(tmp_path):
    ident = generate_identity("C1", tmp_path / "k")
    for name, key in ((SIGNING_KEY_FILE, ident.signing_key), (KEM_KEY_FILE, ident.kem_private)):
        legacy = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.BestAvailableEncryption(b"old-pw"))  # the pre-scrypt writer
        (tmp_path / "k" / name).write_bytes(legacy)
    assert load_identity(tmp_path / "k", passphrase="old-pw").public == ident.public
    r = runner.invoke(app, ["rekey", "--keys", str(tmp_path / "k"), "--passphrase-env", "OLD",
                            "--new-passphrase-env", "NEW", "--scrypt-log2n", str(CHEAP)],
                      env={"OLD": "old-pw", "NEW": "new-pw"})
    assert r.exit_code == 0, r.output
    assert "scrypt" in (tmp_path / "k" / SIGNING_KEY_FILE).read_text()
    assert stat.S_IMODE((tmp_path / "k" / SIGNING_KEY_FILE).stat().st_mode) == 0o600
    assert load_identity(tmp_path / "k", passphrase="new-pw").public == ident.public
