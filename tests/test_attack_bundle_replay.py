"""Issue 14 item 7: replay protection must not fail open.

Attacks: (a) delete the receiver's ledger and re-submit a bundle it already opened; (b) re-submit a
captured bundle months later (``created`` was never checked) or one dated in the future; (c) call
the API without a ledger (``ledger=None`` was the default). Each is refused with one line, nothing
written. The ledger's directory is fsync'd after its atomic rename.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from typer.testing import CliRunner

from centre_node.cli import app
from histodd_fed.bundle import (BundleError, KeyFileError, Ledger, Limits, ReplayError, TrustStore,
                                generate_identity, open_bundle, seal)
from histodd_fed.bundle.hostile import forge_bundle
from histodd_fed.patchset import PatchSet

runner = CliRunner()


@pytest.fixture()
def world(tmp_path):
    ids = {c: generate_identity(c, tmp_path / c) for c in ("C1", "C2")}
    store = TrustStore.load(tmp_path / "C2")
    store.add(ids["C1"].public)
    store.save()
    rng = np.random.default_rng(0)
    ps = PatchSet(images=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), labels=np.array([0, 1, 0, 1]),
                  class_names=["normal", "tumour"], kind="synthetic", meta={"seed": 0})
    return tmp_path, ids, ps


def _open(tmp_path, bundle, out):
    return runner.invoke(app, ["open", str(bundle), "--keys", str(tmp_path / "C2"), "--out", str(tmp_path / out)])


def _refused(r, exc_type, tmp_path, out):
    assert r.exit_code != 0 and isinstance(r.exception, exc_type), f"{r.output} {r.exception!r}"
    assert isinstance(r.exception, BundleError) and "\n" not in str(r.exception)
    assert not (tmp_path / out).exists()
    return str(r.exception)


def test_attack_delete_the_ledger_and_replay(world):
    tmp_path, ids, ps = world
    bundle = seal(ps, ids["C1"], [ids["C2"].public], out=tmp_path / "b.hdb")
    assert _open(tmp_path, bundle, "o1").exit_code == 0
    os.unlink(tmp_path / "C2" / "ledger.json")  # the attacker (or a careless clean-up) removes the ledger
    msg = _refused(_open(tmp_path, bundle, "o2"), KeyFileError, tmp_path, "o2")
    assert "ledger" in msg and "vanished" in msg


def test_attack_rolled_back_ledger_is_refused(world):
    tmp_path, ids, ps = world
    led = tmp_path / "C2" / "ledger.json"
    a = seal(ps, ids["C1"], [ids["C2"].public], out=tmp_path / "a.hdb")
    assert _open(tmp_path, a, "o1").exit_code == 0
    old = led.read_bytes()
    b = seal(ps, ids["C1"], [ids["C2"].public], out=tmp_path / "b.hdb")
    assert _open(tmp_path, b, "o2").exit_code == 0
    led.write_bytes(old)  # restore an older copy that does not yet list b
    _refused(_open(tmp_path, b, "o3"), KeyFileError, tmp_path, "o3")


def test_attack_replay_an_old_captured_bundle(world):
    tmp_path, ids, ps = world
    old = (datetime.now(timezone.utc) - timedelta(days=45)).isoformat(timespec="seconds")
    stale = tmp_path / "stale.hdb"
    stale.write_bytes(forge_bundle(ps, ids["C1"], [ids["C2"].public], created=old))
    msg = _refused(_open(tmp_path, stale, "o"), ReplayError, tmp_path, "o")
    assert "older than" in msg
    assert Ledger.in_key_dir(tmp_path / "C2").entries() == {}  # (keygen wrote the empty ledger)
    # the window is configurable: a 60-day window accepts it
    r = runner.invoke(app, ["open", str(stale), "--keys", str(tmp_path / "C2"), "--out", str(tmp_path / "ok"),
                            "--max-age-days", "60"])
    assert r.exit_code == 0, r.output


def test_attack_future_dated_bundle(world):
    tmp_path, ids, ps = world
    future = (datetime.now(timezone.utc) + timedelta(days=3)).isoformat(timespec="seconds")
    f = tmp_path / "future.hdb"
    f.write_bytes(forge_bundle(ps, ids["C1"], [ids["C2"].public], created=future))
    assert "future" in _refused(_open(tmp_path, f, "o"), ReplayError, tmp_path, "o")


def test_attack_open_without_a_ledger(world):
    tmp_path, ids, ps = world
    blob = seal(ps, ids["C1"], [ids["C2"].public])
    trust = TrustStore.load(tmp_path / "C2")
    with pytest.raises(KeyFileError, match="ledger"):
        open_bundle(blob, ids["C2"], trust, None)
    with pytest.raises(TypeError):
        open_bundle(blob, ids["C2"], trust)  # no default: the caller must choose
    from histodd_fed.bundle import NO_LEDGER
    open_bundle(blob, ids["C2"], trust, NO_LEDGER)  # the explicit opt-out (tests, benchmarks)
    led = Ledger.in_key_dir(tmp_path / "C2")
    open_bundle(blob, ids["C2"], trust, led, limits=Limits(max_age_seconds=3600))
    with pytest.raises(ReplayError):
        open_bundle(blob, ids["C2"], trust, led)


def test_ledger_directory_is_fsynced_after_the_rename(world, monkeypatch):
    import stat

    tmp_path, ids, ps = world
    synced: list[bool] = []
    real = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    led = Ledger.in_key_dir(tmp_path / "C2")
    with led.claim(ids["C1"].public.sign_key_id, "a" * 32, "0" * 64, {"source": "C1"}):
        pass
    assert synced and synced[-1] is True, synced  # the last fsync is the directory's, after the rename
