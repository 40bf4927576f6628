"""The study through Flower's own entry point: ``flwr run`` against a simulation-mode SuperLink.

Instead of the deprecated ``flwr.simulation.run_simulation`` (which prints a deprecation banner and
Ray / alembic warnings into the console), :func:`run_flwr_simulation` starts its OWN
``flower-superlink --simulation`` on a free loopback port (so it never meets another user's managed
local SuperLink on the fixed ports 39091 / 39093), writes ``$FLWR_HOME/config.toml`` with that
connection, runs ``flwr run <repo> histodd-sim --stream`` with the study as a run-config TOML file,
and stops the SuperLink by its pid. The ServerApp / ClientApp are the demo's; simulated nodes read
their centre config from the node table named by ``HISTODD_SIM_NODES`` (inherited by the SuperLink
and its simulation process). Everything Flower, Ray and the apps print goes to
``<study>/flwr-sim/flwr-run.log``; the console gets only the ``[study]`` progress lines.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from histodd_fed.atomic import atomic_write_json, atomic_write_text
from histodd_fed.errors import HistoddError

REPO_ROOT = Path(__file__).resolve().parents[2]
CONNECTION = "histodd-sim"
SIM_NODES_ENV = "HISTODD_SIM_NODES"


class SimulationError(HistoddError):
    """The local simulation could not be started or did not produce a study report."""


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def run_flwr_simulation(run_config: dict[str, Any], node_configs: list[dict[str, Any]], study_dir: Path, *,
                        timeout: float, say: Callable[[str], None] = print) -> Path:
    """Run the app once in simulation through ``flwr run``; returns the study's ``report.json`` path."""
    root = Path(study_dir) / "flwr-sim"
    home = root / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    table = Path(study_dir) / "sim-nodes.json"
    atomic_write_json(table, node_configs)
    from histodd_fed.federation.deployment import free_port

    port = free_port()
    atomic_write_text(home / "config.toml", f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                            f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    rc_file = root / "run-config.toml"
    atomic_write_text(rc_file, "".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config.items()))
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), FLWR_HOME=str(home),
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", HISTODD_NO_PROGRESS="1",
               RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0", RAY_DEDUP_LOGS="0", PYTHONWARNINGS="ignore")
    env[SIM_NODES_ENV] = str(table.resolve())
    log_path = root / "flwr-run.log"
    report = Path(study_dir) / "report.json"
    if report.exists():
        report.unlink()
    with open(root / "superlink.log", "wb") as sl_log, open(log_path, "w") as run_log:
        link = subprocess.Popen([os.path.join(bindir, "flower-superlink"), "--insecure", "--simulation",
                                 "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port),
                                 "--disable-runtime-dependency-installation", "--database",
                                 str(root / "superlink.db")], env=env, stdout=sl_log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while True:
                if link.poll() is not None:
                    raise SimulationError(f"flower-superlink exited ({link.returncode}); see {root / 'superlink.log'}")
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SimulationError(f"flower-superlink not reachable on port {port} within 60 s") from None
                    time.sleep(0.5)
            time.sleep(1.0)
            cmd = [os.path.join(bindir, "flwr"), "run", str(REPO_ROOT), CONNECTION, "--stream",
                   "--federation-config", f"num-supernodes={len(node_configs)}", "--run-config", str(rc_file)]
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    cwd=str(REPO_ROOT))
            t_end = time.monotonic() + timeout
            assert proc.stdout is not None
            for line in proc.stdout:
                run_log.write(line)
                run_log.flush()
                if "[study]" in line:
                    say(line.split("[study]", 1)[1].strip())
                if time.monotonic() > t_end:
                    proc.kill()
                    raise SimulationError(f"flwr run did not finish within {timeout:.0f} s; see {log_path}")
            proc.wait()
            # --stream can end before the ServerApp's last write lands: wait briefly for the report
            for _ in range(60):
                if report.exists():
                    break
                time.sleep(1.0)
            if proc.returncode != 0 or not report.exists():
                raise SimulationError(f"flwr run exited {proc.returncode} without {report.name}; see {log_path}")
        finally:
            if link.poll() is None:
                os.killpg(link.pid, signal.SIGTERM)   # the SuperLink we started, and its children
                try:
                    link.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(link.pid, signal.SIGKILL)
                    link.wait(5)
    return report
