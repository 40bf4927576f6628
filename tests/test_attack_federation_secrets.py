"""Attacks on the key passphrase in the environment (issue 24 item 7): a centre's key passphrase
source ``env:NAME`` must leave the environment once the keys are unlocked, and must never reach a
Flower process that does not unlock keys (SuperLink, SuperNode, ``flwr run``, ``flwr supernode
register``); only the centre's own app guard, which starts its ClientApps, carries it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from histodd_fed.federation.envelope import Envelope

SECRET = "correct horse battery staple 24"
NONCE = "cd" * 32


def _environ(pid: int, timeout: float = 10.0) -> bytes:
    """The environment ``pid`` was started with. Right after ``Popen`` returns, the kernel may not yet
    have filled in the new image's environment (``/proc/PID/environ`` reads empty until exec finishes
    setting up the stack), so read until it is there; a process that exited has none to leak."""
    deadline = time.monotonic() + timeout
    while True:
        env = Path(f"/proc/{pid}/environ").read_bytes()
        if env or time.monotonic() > deadline:
            return env
        time.sleep(0.05)


def test_attack_child_of_an_unlocked_centre_reads_the_passphrase(tmp_path, monkeypatch):
    """A centre unlocked its keys from env:HISTODD_KEY_PASSPHRASE (its identity request); any process
    it starts afterwards (a data loader worker, a tool, a compromised dependency's subprocess) inherits
    the environment. The passphrase must be gone from it."""
    from histodd_fed.federation.centre import CentreConfig, CentreNode
    from histodd_fed.federation.enrol import enrol

    monkeypatch.setenv("HISTODD_KEY_PASSPHRASE", SECRET)
    (tmp_path / "d").mkdir()
    (cfg,), _ = enrol(tmp_path, {"C1": tmp_path / "d"}, key_passphrase="env:HISTODD_KEY_PASSPHRASE", scrypt_log2n=12)
    node = CentreNode(CentreConfig.from_node_config(cfg.to_node_config()))
    rep = node.handle("identity", Envelope(body={"prepare": False, "nonce": NONCE}), run_id=1, node_id=2)
    assert rep.body["ok"], rep.body
    child = subprocess.run([sys.executable, "-c", "import os; print(dict(os.environ))"], capture_output=True,
                           text=True, check=True)
    assert SECRET not in child.stdout, "a child of the unlocked centre read the key passphrase"
    # unlocked once per process: a second request still answers
    rep = node.handle("identity", Envelope(body={"prepare": False, "nonce": NONCE}), run_id=1, node_id=2)
    assert rep.body["ok"], rep.body


@pytest.mark.flower
def test_attack_passphrase_reaches_the_flower_processes(tmp_path, monkeypatch):
    """The coordinator's host runs the deployment with a centre whose keys unlock from
    env:HISTODD_KEY_PASSPHRASE. Anyone who can read the SuperLink's or SuperNode's environment (their
    own user, a crash dump, a /proc reader) must not find it there; only the centre's app guard has it."""
    from histodd_fed.federation.deployment import Deployment
    from histodd_fed.federation.enrol import enrol
    from test_attack_federation_fab import consortium_release

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("HISTODD_KEY_PASSPHRASE", SECRET)
    (tmp_path / "d").mkdir()
    (cfg,), _ = enrol(tmp_path / "fed", {"C1": tmp_path / "d"}, key_passphrase="env:HISTODD_KEY_PASSPHRASE",
                      scrypt_log2n=12)
    with Deployment(tmp_path / "dep") as dep:
        dep.start_superlink()
        dep.use_release(consortium_release(tmp_path))
        dep.add_supernode("C1", cfg.node_config_string())
        envs = {name: _environ(int(pid)) for pid, name in
                (line.split()[:2] for line in (dep.root / "pids.txt").read_text().splitlines())}
        flwr_env = dep.env()
    unread = sorted(name for name, env in envs.items() if not env)
    assert not unread, f"no environment to inspect for {unread} (exited?)"
    leaked = sorted(name for name, env in envs.items() if SECRET.encode() in env and not name.startswith("app-guard-"))
    assert not leaked, f"the key passphrase reached {leaked}"
    assert SECRET not in flwr_env.values(), "flwr run / flwr supernode register get the key passphrase"
    assert SECRET.encode() in envs["app-guard-C1.log"], "the centre's guard needs it to start its ClientApps"
