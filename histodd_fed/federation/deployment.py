"""Deployment runtime on one machine: a TLS SuperLink with SuperNode authentication, one
SuperNode per centre, each a separate process on 127.0.0.1, and ``flwr run`` against them.

Plain subprocess management (no flwr import): :class:`Deployment` writes
``$FLWR_HOME/config.toml``, certificates and node keys under its directory, starts
``flower-superlink`` (never installing dependencies at run time; Control, Fleet and Runtime APIs
on 127.0.0.1 only), registers each node's public key with ``flwr supernode register``, starts
``flower-supernode --isolation process`` per centre next to that centre's own ClientApp launcher
(``centre_node.app_guard``: only an approved FAB is ever installed or imported), and records every
pid in ``pids.txt`` so ``stop`` (or ``examples/deploy/stop.sh``) always cleans up.

App approval: :meth:`Deployment.stage_app` copies the app's sources into ``<root>/app``, signs
that FAB with the consortium's app key (``<root>/app-key.pem``, made on first use) and writes
``<root>/app-trust.json`` (the key's public half) which each centre pins; ``run_app`` submits
exactly that staged app.
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

    # -------------------------------------------------------------- the approved app
    @property
    def app_dir(self) -> Path:
        return self.root / "app"

    @property
    def app_trust(self) -> Path:
        return self.root / "app-trust.json"

    def build_fab(self, app_dir: Path) -> bytes:
        """The FAB ``flwr run app_dir`` submits (Flower's own builder, in a subprocess)."""
        code = ("import sys; from pathlib import Path; from flwr.cli.build import build_fab_from_disk; "
                "sys.stdout.buffer.write(build_fab_from_disk(Path(sys.argv[1])))")
        r = subprocess.run([sys.executable, "-c", code, str(app_dir)], env=self.env(), capture_output=True,
                           timeout=300)
        if r.returncode != 0:
            raise DeploymentError(f"building the FAB of {app_dir} failed: {r.stderr.decode()[-400:]}")
        return r.stdout

    def stage_app(self, app_key: Path | None = None) -> Path:
        """Copy the app into ``<root>/app``, sign it with the consortium app key, write the app trust."""
        import base64
        import shutil

        from histodd_fed.federation.app_trust import SIGNATURE_FILE, AppTrust, check_fab, generate_app_key, sign_fab

        app = self.app_dir
        if app.exists():
            shutil.rmtree(app)
        app.mkdir(parents=True)
        shutil.copy2(REPO_ROOT / "pyproject.toml", app / "pyproject.toml")
        keep = {".py", ".yaml", ".json", ".toml"}
        for pkg in ("centre_node", "coordinator", "histodd_fed"):
            for f in sorted((REPO_ROOT / pkg).rglob("*")):
                if f.is_file() and f.suffix in keep and "__pycache__" not in f.parts:
                    dst = app / f.relative_to(REPO_ROOT)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, dst)
        key = Path(app_key) if app_key else self.root / "app-key.pem"
        if not key.exists():
            _, pub = generate_app_key(key)
        else:
            from cryptography.hazmat.primitives import serialization

            pub = serialization.load_pem_private_key(key.read_bytes(), password=None).public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        atomic_write_text(app / SIGNATURE_FILE, json.dumps(sign_fab(self.build_fab(app), key), indent=1) + "\n")
        atomic_write_text(self.app_trust, json.dumps({"format": "histodd-app-trust", "format_version": 1,
                                                      "digests": [], "keys": [base64.b64encode(pub).decode()]}))
        check_fab(self.build_fab(app), AppTrust.load(self.app_trust))  # what flwr run will submit passes
        return app

    def add_supernode(self, name: str, node_config: str, app_trust: Path | None = None) -> subprocess.Popen:
        """Register ``name``'s EC P-384 key; start its SuperNode (process isolation) and its app guard.

        ``app_trust``: the centre's pinned app trust (default: the staged app's, see :meth:`stage_app`).
        """
        trust = Path(app_trust) if app_trust else self.app_trust
        if not trust.exists():
            raise DeploymentError(f"{trust}: no app trust file (call stage_app() first)")
        keys = make_node_keys(self.root / "node-keys", name)
        r = subprocess.run([_bin("flwr"), "supernode", "register", str(keys["public"]), CONNECTION],
                           env=self.env(), cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise DeploymentError(f"flwr supernode register {name} failed: {(r.stdout + r.stderr).strip()[-400:]}")
        runtime_port = free_port()
        node = self._spawn([_bin("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                            "--root-certificates", str(self.root / "certs" / "ca.crt"),
                            "--auth-supernode-private-key", str(keys["private"]),
                            "--isolation", "process", "--host", "127.0.0.1",
                            "--port", str(runtime_port), "--node-config", node_config], f"supernode-{name}.log")
        self._spawn([sys.executable, "-m", "centre_node.app_guard", "launch", "--runtime-api-address",
                     f"127.0.0.1:{runtime_port}", "--app-trust", str(trust), "--insecure"], f"app-guard-{name}.log")
        return node

    # -------------------------------------------------------------- run
    def run_app(self, run_config: dict[str, Any], timeout: float = 1800.0, app_dir: Path | None = None) -> str:
        """``flwr run <staged app> histodd --stream`` with ``run_config``; returns its output."""
        rc = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        app = Path(app_dir) if app_dir else (self.app_dir if self.app_dir.exists() else self.stage_app())
        args = [_bin("flwr"), "run", str(app), CONNECTION, "--stream", "--run-config", rc]
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
