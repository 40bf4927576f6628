"""Deployment runtime on one machine: a TLS SuperLink with SuperNode authentication, one
SuperNode per centre, each a separate process on 127.0.0.1, and ``flwr run`` against them.

Plain subprocess management (no flwr import): :class:`Deployment` writes
``$FLWR_HOME/config.toml``, certificates and node keys under its directory, starts
``flower-superlink`` (never installing dependencies at run time; Control, Fleet and Runtime APIs
on 127.0.0.1 only), registers each node's public key with ``flwr supernode register``, starts
``flower-supernode --isolation process`` per centre next to that centre's own ClientApp launcher
(``centre_node.app_guard``: only an approved FAB is ever installed or imported), and records every
pid in ``pids.txt`` so ``stop`` (or ``examples/deploy/stop.sh``) always cleans up.

App approval: the consortium signs the app with its app key, which the coordinator never holds
(:mod:`histodd_fed.federation.app_release`); :meth:`Deployment.use_release` copies that signed
release's app into ``<root>/app`` (``run_app`` submits exactly that app) and starts each centre's
guard with the release's ``app-trust.json`` (public key only).
"""

from __future__ import annotations

import json
import logging
import os
import re
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
#: environment variables never passed to a Flower process (the key passphrase of the CLIs, and any
#: name that looks like a secret); a centre's own ``key-passphrase=env:NAME`` goes to its guard only
PASSPHRASE_ENV = "HISTODD_KEY_PASSPHRASE"
_SECRET_NAME = re.compile(r"PASSPHRASE|PASSWORD|PASSWD|SECRET|PRIVATE|(?:^|_)PW(?:$|_)", re.IGNORECASE)
_NODE_PASSPHRASE_ENV = re.compile(r'(?:^|\s)key-passphrase="?env:([A-Za-z_][A-Za-z0-9_]*)')


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
    pinned_trust: Path | None = None   # the release's app-trust.json the centres' guards pin
    secret_envs: set[str] = field(default_factory=lambda: {PASSPHRASE_ENV})  # never passed on, see env()

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.port = self.port or free_port()

    # -------------------------------------------------------------- environment
    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    def env(self, secrets: tuple[str, ...] = ()) -> dict[str, str]:
        """A child's environment: without key passphrases (``secret_envs`` and secret-looking names),
        except the ``secrets`` this child needs (a centre's guard: its own ``key-passphrase`` variable)."""
        env = {k: v for k, v in os.environ.items()
               if k in secrets or not (k in self.secret_envs or _SECRET_NAME.search(k))}
        env.update(FLWR_HOME=str(self.flwr_home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                   PYTHONUNBUFFERED="1")
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def _spawn(self, args: list[str], log_name: str, secrets: tuple[str, ...] = ()) -> subprocess.Popen:
        logf = open(self.root / "logs" / log_name, "ab")  # noqa: SIM115 - owned by the child
        p = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, env=self.env(secrets), cwd=str(REPO_ROOT),
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

    def build_fab(self, app_dir: Path) -> bytes:
        """The FAB ``flwr run app_dir`` submits (Flower's own builder, in a subprocess)."""
        from histodd_fed.federation.app_release import build_fab

        return build_fab(app_dir, env=self.env())

    def use_release(self, release: str | Path) -> Path:
        """Take the consortium's signed release (``release/app``, ``release/app-trust.json``,
        :mod:`histodd_fed.federation.app_release`); the coordinator never holds the app key."""
        import shutil

        from histodd_fed.federation.app_trust import AppTrust, check_fab

        release = Path(release).resolve()
        if not (release / "app").is_dir() or not (release / "app-trust.json").is_file():
            raise DeploymentError(f"{release}: not a signed app release (app/, app-trust.json; "
                                  f"python -m histodd_fed.federation.app_release sign)")
        if self.app_dir.exists():
            shutil.rmtree(self.app_dir)
        shutil.copytree(release / "app", self.app_dir)
        self.pinned_trust = release / "app-trust.json"
        check_fab(self.build_fab(self.app_dir), AppTrust.load(self.pinned_trust))  # what flwr run submits passes
        return self.app_dir

    def add_supernode(self, name: str, node_config: str, app_trust: Path | None = None) -> subprocess.Popen:
        """Register ``name``'s EC P-384 key; start its SuperNode (process isolation) and its app guard.

        ``app_trust``: the centre's pinned app trust (default: the release's, see :meth:`use_release`).
        """
        passphrase = tuple(_NODE_PASSPHRASE_ENV.findall(node_config))  # this centre's guard only
        self.secret_envs.update(passphrase)
        trust = Path(app_trust) if app_trust else self.pinned_trust
        if trust is None or not trust.exists():
            raise DeploymentError(f"{trust}: no app trust file (call use_release() first)")
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
                     f"127.0.0.1:{runtime_port}", "--app-trust", str(trust), "--insecure"], f"app-guard-{name}.log",
                    secrets=passphrase)
        return node

    # -------------------------------------------------------------- run
    def run_app(self, run_config: dict[str, Any], timeout: float = 1800.0, app_dir: Path | None = None) -> str:
        """``flwr run <staged app> histodd --stream`` with ``run_config``; returns its output."""
        rc = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        app = Path(app_dir) if app_dir else self.app_dir
        if not app.is_dir():
            raise DeploymentError(f"{app}: no app to submit (call use_release() first)")
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
