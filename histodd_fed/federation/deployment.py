"""Deployment runtime on one machine: a TLS SuperLink with SuperNode authentication, one
SuperNode per centre, each a separate process on 127.0.0.1, and ``flwr run`` against them.

Plain subprocess management (no flwr import): :class:`Deployment` writes
``$FLWR_HOME/config.toml``, certificates and node keys under its directory, starts
``flower-superlink`` (never installing dependencies at run time), registers each node's public
key with ``flwr supernode register``, starts ``flower-supernode`` per centre, and records every
pid in ``pids.txt`` so ``stop`` (or ``examples/deploy/stop.sh``) always cleans up.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histodd_fed.atomic import atomic_write_text
from histodd_fed.errors import HistoddError
from histodd_fed.federation.certs import make_node_keys, make_tls

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
CONNECTION = "histodd"


class DeploymentError(HistoddError):
    """A Flower process failed to start or a run failed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    cand = Path(sys.executable).with_name(name)
    return str(cand) if cand.exists() else name


@dataclass
class Deployment:
    """Processes of one local deployment, all under ``root``."""

    root: Path
    port: int = 0
    procs: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.port = self.port or free_port()

    # -------------------------------------------------------------- environment
    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(FLWR_HOME=str(self.flwr_home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                   PYTHONUNBUFFERED="1")
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        logf = open(self.root / "logs" / log_name, "ab")  # noqa: SIM115 - owned by the child
        p = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, env=self.env(), cwd=str(REPO_ROOT),
                             start_new_session=True)
        self.procs.append(p)
        with open(self.root / "pids.txt", "a") as f:
            f.write(f"{p.pid} {log_name}\n")
        return p

    # -------------------------------------------------------------- start
    def start_superlink(self, timeout: float = 60.0) -> None:
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        tls = make_tls(self.root / "certs")
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.flwr_home / "config.toml",
                          f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                          f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{tls["ca"]}"\n')
        self._spawn([_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                     "--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]),
                     "--ssl-keyfile", str(tls["key"]), "--enable-supernode-auth",
                     "--disable-runtime-dependency-installation",
                     "--database", str(self.root / "superlink.db")], "superlink.log")
        self._wait_health(timeout)

    def _wait_health(self, timeout: float) -> None:
        import ssl

        ctx = ssl.create_default_context(cafile=str(self.root / "certs" / "ca.crt"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs and self.procs[0].poll() is not None:
                raise DeploymentError(f"flower-superlink exited ({self.procs[0].returncode}); see "
                                      f"{self.root / 'logs' / 'superlink.log'}")
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{self.port}/health", timeout=2, context=ctx):
                    return
            except OSError:
                time.sleep(0.5)
        raise DeploymentError(f"SuperLink on port {self.port} not healthy after {timeout:.0f}s")

    def add_supernode(self, name: str, node_config: str) -> subprocess.Popen:
        """Register ``name``'s EC P-384 key with the SuperLink and start its SuperNode."""
        keys = make_node_keys(self.root / "node-keys", name)
        r = subprocess.run([_bin("flwr"), "supernode", "register", str(keys["public"]), CONNECTION],
                           env=self.env(), cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise DeploymentError(f"flwr supernode register {name} failed: {(r.stdout + r.stderr).strip()[-400:]}")
        return self._spawn([_bin("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                            "--root-certificates", str(self.root / "certs" / "ca.crt"),
                            "--auth-supernode-private-key", str(keys["private"]),
                            "--port", str(free_port()), "--node-config", node_config], f"supernode-{name}.log")

    # -------------------------------------------------------------- run
    def run_app(self, run_config: dict[str, Any], timeout: float = 1800.0) -> str:
        """``flwr run . histodd --stream`` with ``run_config``; returns its output."""
        rc = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        args = [_bin("flwr"), "run", str(REPO_ROOT), CONNECTION, "--stream", "--run-config", rc]
        try:
            r = subprocess.run(args, env=self.env(), cwd=str(REPO_ROOT), capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise DeploymentError(f"flwr run did not finish in {timeout:.0f}s") from exc
        out = r.stdout + r.stderr
        atomic_write_text(self.root / "logs" / "flwr-run.log", out)
        if r.returncode != 0:
            raise DeploymentError(f"flwr run exited {r.returncode}: {out.strip()[-600:]}")
        return out

    # -------------------------------------------------------------- stop
    def stop(self) -> None:
        stop_pids(self.root)
        for p in self.procs:  # reap our children (no zombies left behind)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_pids(root: str | Path, grace: float = 5.0) -> int:
    """Terminate (then kill) every process group recorded in ``root/pids.txt``; returns how many."""
    f = Path(root) / "pids.txt"
    if not f.exists():
        return 0
    pids = [int(line.split()[0]) for line in f.read_text().splitlines() if line.strip()]
    for pid in reversed(pids):
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.1)
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    f.unlink()
    return len(pids)
