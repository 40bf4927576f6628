"""The coordinator's Flower ServerApp (thin): a Grid-backed transport for the study logic.

Deployment (``flwr run . CONNECTION --run-config ...``) reads the study from the run config
(keys of ``[tool.flwr.app.config]`` in pyproject.toml). The simulation runtime
(:func:`run_simulation_study`) builds a ServerApp around a given :class:`StudyConfig`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from histodd_fed.federation.coordinator import StudyConfig, StudyOutcome, run_transfer_study
from histodd_fed.federation.envelope import Envelope
from histodd_fed.federation.flower_records import envelope_to_recorddict, recorddict_to_envelope
from histodd_fed.federation.study import write_report

log = logging.getLogger(__name__)


class GridTransport:
    """:class:`~histodd_fed.federation.coordinator.Transport` over a Flower Grid."""

    def __init__(self, grid: Grid, run_id: int | None = None):
        self.grid = grid
        self.round = 0
        self.run_id = int(run_id if run_id is not None else getattr(getattr(grid, "run", None), "run_id", 0) or 0)

    def node_ids(self) -> list[int]:
        return sorted(int(n) for n in self.grid.get_node_ids())

    def exchange(self, requests: list[tuple[int, str, Envelope]], timeout: float) -> dict[int, Envelope | str]:
        self.round += 1
        msgs = [Message(envelope_to_recorddict(env), dst_node_id=n, message_type=f"query.{action}",
                        group_id=str(self.round), ttl=max(timeout + 60.0, 120.0))
                for n, action, env in requests]
        out: dict[int, Envelope | str] = {}
        for rep in self.grid.send_and_receive(msgs, timeout=timeout):
            n = int(rep.metadata.src_node_id)
            if rep.has_error():
                out[n] = f"Flower error {rep.error.code}: {rep.error.reason}"
                continue
            try:
                out[n] = recorddict_to_envelope(rep.content)
            except Exception as exc:  # noqa: BLE001 - a malformed reply is that centre's fault
                out[n] = f"malformed reply: {exc}"
        return out


def study_config_from_run_config(rc: dict[str, Any]) -> StudyConfig:
    """StudyConfig from Flower run-config keys (dash-case)."""
    ipcs = str(rc.get("ipcs", "10")).replace(" ", "")
    return StudyConfig(
        source=str(rc.get("source", "C1")), target=str(rc.get("target", "C2")),
        ipcs=[int(i) for i in ipcs.split(",") if i],
        full=bool(rc.get("full", True)), both_directions=bool(rc.get("both-directions", False)),
        fine_tune_epochs=int(rc.get("fine-tune-epochs", 5)), seed=int(rc.get("seed", 0)),
        preset=str(rc.get("preset", "cpu")), reply_timeout=float(rc.get("reply-timeout", 900)),
        identity_timeout=float(rc.get("identity-timeout", rc.get("reply-timeout", 900))),
        discovery_timeout=float(rc.get("discovery-timeout", 120)),
        study_dir=Path(str(rc.get("study-dir", "results/transfer/latest"))),
        trust=Path(str(rc["trust"])) if rc.get("trust") else None,
        runtime=str(rc.get("runtime", "deployment")),
        extras=json.loads(str(rc.get("extras") or "[]")),
        sources=[x for x in str(rc.get("sources") or "").replace(" ", "").split(",") if x],
    )


def _run(grid: Grid, cfg: StudyConfig, run_id: int | None = None) -> StudyOutcome:
    outcome = run_transfer_study(GridTransport(grid, run_id), cfg, on_event=lambda m: log.info("[study] %s", m))
    write_report(cfg, outcome, command=f"coordinator transfer ({cfg.runtime})")
    return outcome


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry: the study described by the run config."""
    _run(grid, study_config_from_run_config(dict(context.run_config)), context.run_id)


def run_simulation_study(cfg: StudyConfig, node_configs: list[dict[str, Any]], *,
                         verbose: bool = False) -> StudyOutcome:
    """Run the study with the Flower simulation runtime: one simulated node per centre config."""
    from flwr.simulation import run_simulation

    from centre_node.client_app import SIM_NODES_ENV
    from centre_node.client_app import app as client_app
    from histodd_fed.atomic import atomic_write_json

    table = Path(cfg.study_dir) / "sim-nodes.json"
    atomic_write_json(table, node_configs)
    os.environ[SIM_NODES_ENV] = str(table.resolve())
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    result: dict[str, StudyOutcome] = {}
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        result["outcome"] = _run(grid, cfg, context.run_id)

    t0 = time.perf_counter()
    run_simulation(server_app=server, client_app=client_app, num_supernodes=len(node_configs),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": max(2, len(node_configs)), "log_to_driver": verbose,
                                                 "include_dashboard": False, "logging_level": "error"}},
                   verbose_logging=verbose)
    if "outcome" not in result:
        from histodd_fed.errors import HistoddError

        raise HistoddError(f"simulation ended after {time.perf_counter() - t0:.0f}s without a study result")
    return result["outcome"]
