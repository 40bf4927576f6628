"""Identities, key files, the trust store and the replay ledger."""

from __future__ import annotations

import json
import stat

import pytest

from histodd_fed.bundle import (KeyFileError, Ledger, ReplayError, RevokedSignerError, TrustConflictError,
                                TrustStore, UntrustedSignerError, generate_identity, load_identity,
                                load_public_identity)
from histodd_fed.bundle.identity import IDENTITY_FILE, KEM_KEY_FILE, SIGNING_KEY_FILE, key_id


def test_generate_and_load_identity(tmp_path):
    ident = generate_identity("C1", tmp_path / "k")
    for f in (SIGNING_KEY_FILE, KEM_KEY_FILE):
        assert stat.S_IMODE((tmp_path / "k" / f).stat().st_mode) == 0o600
        assert (tmp_path / "k" / f).read_text().startswith("-----BEGIN PRIVATE KEY-----")
    pub = json.loads((tmp_path / "k" / IDENTITY_FILE).read_text())
    assert pub["centre_id"] == "C1" and "PRIVATE" not in json.dumps(pub)
    assert pub["sign_key_id"] == key_id(ident.public.sign_public) and len(pub["sign_key_id"]) == 32
    again = load_identity(tmp_path / "k")
    assert again.public == ident.public
    assert load_public_identity(tmp_path / "k") == load_public_identity(tmp_path / "k" / IDENTITY_FILE)
    with pytest.raises(KeyFileError, match="already holds"):
        generate_identity("C1", tmp_path / "k")
    with pytest.raises(KeyFileError, match="invalid centre id"):
        generate_identity("bad id!", tmp_path / "k2")


def test_passphrase_protected_keys(tmp_path):
    generate_identity("C1", tmp_path / "k", passphrase="correct horse")
    assert "ENCRYPTED PRIVATE KEY" in (tmp_path / "k" / SIGNING_KEY_FILE).read_text()
    with pytest.raises(KeyFileError, match="passphrase-protected"):
        load_identity(tmp_path / "k")
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        load_identity(tmp_path / "k", passphrase="wrong")
    assert load_identity(tmp_path / "k", passphrase="correct horse").centre_id == "C1"


def test_tampered_identity_and_mismatched_keys(tmp_path):
    a = generate_identity("C1", tmp_path / "a")
    generate_identity("C2", tmp_path / "b")
    d = json.loads((tmp_path / "a" / IDENTITY_FILE).read_text())
    d["sign_key_id"] = "0" * 32
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(KeyFileError, match="does not match"):
        load_public_identity(tmp_path / "bad.json")
    (tmp_path / "b" / IDENTITY_FILE).write_text(json.dumps(a.public.to_dict()))  # keys of b, identity of a
    with pytest.raises(KeyFileError, match="do not match"):
        load_identity(tmp_path / "b")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(KeyFileError, match="not valid JSON"):
        load_public_identity(tmp_path / "junk.json")
    with pytest.raises(KeyFileError, match="cannot read"):
        load_public_identity(tmp_path / "missing.json")


def test_trust_store_pinning_revocation_and_persistence(tmp_path):
    me = tmp_path / "me"
    generate_identity("C0", me)
    c1 = generate_identity("C1", tmp_path / "c1")
    c1b = generate_identity("C1", tmp_path / "c1b")  # a different key claiming to be C1
    store = TrustStore.load(me)
    assert store.add(c1.public) is True and store.add(c1.public) is False
    store.save()
    with pytest.raises(TrustConflictError, match="pinned"):
        TrustStore.load(me).add(c1b.public)
    store = TrustStore.load(me)
    assert store.signer("C1", c1.public.sign_key_id) == c1.public
    with pytest.raises(UntrustedSignerError, match="not the pinned key"):
        store.signer("C1", c1b.public.sign_key_id)
    with pytest.raises(UntrustedSignerError, match="not in the trust store"):
        store.signer("C9", c1.public.sign_key_id)
    # rotation with replace revokes the old key
    store.add(c1b.public, replace=True)
    store.save()
    store = TrustStore.load(me)
    with pytest.raises(RevokedSignerError):
        store.signer("C1", c1.public.sign_key_id)
    assert store.signer("C1", c1b.public.sign_key_id) == c1b.public
    store.remove("C1")
    store.save()
    store = TrustStore.load(me)
    assert "C1" not in store and len(store.revoked) == 2
    with pytest.raises(RevokedSignerError, match="revoked"):
        store.signer("C1", c1b.public.sign_key_id)
    with pytest.raises(KeyFileError, match="not in the trust store"):
        store.remove("C1")
    (me / "trust.json").write_text("[]")
    with pytest.raises(KeyFileError, match="not a histodd trust store"):
        TrustStore.load(me)


def test_ledger(tmp_path):
    led = Ledger.in_key_dir(tmp_path)
    k = "k" * 32
    led.check(k, "a" * 32)
    with led.claim(k, "a" * 32, "d" * 64, {"source": "C1"}):
        pass
    with pytest.raises(ReplayError):
        led.check(k, "a" * 32)
    with pytest.raises(ReplayError):  # the same signed digest under any key
        led.check("j" * 32, "c" * 32, digest="d" * 64)
    led.check("j" * 32, "a" * 32)  # another signer's bundle under the same id is not a replay
    with pytest.raises(ReplayError):
        with led.claim(k, "a" * 32, "e" * 64, {}):
            pass
    with pytest.raises(RuntimeError):  # a failing block records nothing
        with led.claim(k, "b" * 32, "f" * 64, {}):
            raise RuntimeError("boom")
    assert set(led.entries()) == {f"{k}:{'a' * 32}"}
    (tmp_path / "ledger.json").write_text("oops")
    with pytest.raises(KeyFileError, match="unreadable replay ledger"):
        led.check(k, "c" * 32)


def test_version_1_ledger_still_refuses_its_entries(tmp_path):
    (tmp_path / "ledger.json").write_text(json.dumps({"format": "histodd-ledger", "format_version": 1, "opened": {
        "a" * 32: {"source": "C1", "created": "2026-01-01T00:00:00+00:00", "opened": "2026-01-01T00:00:01+00:00"}}}))
    led = Ledger.in_key_dir(tmp_path)
    with pytest.raises(ReplayError):
        led.check("k" * 32, "a" * 32, source="C1")
    led.check("k" * 32, "a" * 32, source="C3")  # a legacy entry no longer blocks another centre's id
    led.record("k" * 32, "b" * 32, "d" * 64, {"source": "C1"})
    d = json.loads((tmp_path / "ledger.json").read_text())
    assert d["format_version"] == 3 and len(d["opened"]) == 2
    with pytest.raises(ReplayError):
        Ledger.in_key_dir(tmp_path).check("k" * 32, "a" * 32, source="C1")
