"""``coordinator``: drives cross-centre transfer studies through Flower.

Commands (thin; torch and flwr are imported inside them so ``--help`` is fast):

- ``coordinator certs --out DIR``      CA + SuperLink certificate, SuperNode auth keys
- ``coordinator transfer``             the transfer study (simulation or deployment runtime)
- ``coordinator demo``                 demo slides for C1/C2, keys, trust, the study, the table
- ``coordinator verify-report R``      check R/report.json's rows against the centres' signatures
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer

from histodd_fed.allocator import keep_freed_memory
from histodd_fed.errors import ConfigError, HistoddError
from histodd_fed.logging_setup import configure_logging
from histodd_fed.process_tree import exit_on_sigterm

app = typer.Typer(
    name="coordinator",
    help="Relays sealed bundles between centres through Flower and writes transfer-study reports.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
log = logging.getLogger("coordinator")
#: ``--workers`` when not given, for the hospital benchmark: one process per core up to this many
MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """The hospital benchmark's worker processes when ``--workers`` is not given: this machine's cores (at most
    :data:`MAX_DEFAULT_WORKERS`; the cores this process may run on where the OS says)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cores))


#: seconds to wait for each centre's reply when --timeout is not given (the hospital benchmark: its own)
DEFAULT_REPLY_TIMEOUT = 900.0


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings only; no progress bars."),
) -> None:
    configure_logging(verbose=verbose, quiet=quiet)
    keep_freed_memory()  # tensor buffers reused, not page-faulted anew every step (here and in children)
    exit_on_sigterm()  # `kill` unwinds like Ctrl-C: worker pools and Flower processes stopped, temp files removed


@app.command()
def certs(
    out: Path = typer.Option(..., "--out", help="Directory for ca.crt, server.pem/.key and node keys."),
    nodes: str = typer.Option("C1,C2", help="Comma-separated SuperNode names (one EC P-384 key pair each)."),
    host: list[str] = typer.Option([], "--host", help="Extra SAN host/IP for the server certificate."),
) -> None:
    """Make TLS certificates (SAN 127.0.0.1, localhost) and SuperNode authentication keys."""
    from histodd_fed.federation.certs import make_node_keys, make_tls

    paths = make_tls(out, hosts=list(host))
    for n in [n for n in nodes.split(",") if n]:
        make_node_keys(out / "node-keys", n)
    typer.echo(f"wrote {paths['ca']}, {paths['cert']}, {paths['key']} and node keys for {nodes} in {out / 'node-keys'}")


def _ipcs(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--ipc: expected comma-separated integers, got {text!r}") from None


def _print(outcome, paths) -> None:
    from histodd_fed.federation.study import markdown_table, table_rows

    typer.echo(markdown_table(table_rows(outcome)))
    for f in outcome.faults:
        typer.echo(f"fault: {f.line()}")
    typer.echo(f"study {outcome.seconds:.1f}s; report: {paths}")


@app.command()
def transfer(
    source: str = typer.Option("C1", "--source"),
    target: Optional[str] = typer.Option(None, "--target", help="The target centre (default C2). With --benchmark "
                                         "and hospital centres: a hospital (e.g. 2) or 'all' (leave-one-hospital-out)."),
    sources: Optional[str] = typer.Option(None, "--sources", help="With --benchmark and hospital centres: source "
                                          "hospitals, e.g. 0 or 0,1,3,4 (several: pooled into the target; default: "
                                          "every hospital but the target)."),
    ipc: str = typer.Option("10", "--ipc", help="Comma-separated images-per-class values, e.g. 10,20,50."),
    full: bool = typer.Option(True, "--full/--no-full", help="Also transfer the whole real train split."),
    both_directions: bool = typer.Option(False, "--both-directions"),
    runtime: str = typer.Option("flwr-simulation", "--runtime",
                                help="flwr-simulation (default: `flwr run` on a local simulation-mode SuperLink) | "
                                     "deployment (TLS SuperLink + one SuperNode per centre) | simulation (the "
                                     "deprecated in-process run_simulation)"),
    nodes: Optional[Path] = typer.Option(None, "--nodes", help="JSON list of centre node configs (centre-id, data, key-dir, work-dir, preset)."),
    trust: Optional[Path] = typer.Option(None, "--trust", help="Coordinator trust store (public identities only)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Results folder (default results/transfer/<time>)."),
    epochs: int = typer.Option(5, "--epochs", help="Fine-tuning epochs at the target."),
    preset: str = typer.Option("cpu", "--preset"),
    seed: int = typer.Option(0, "--seed"),
    timeout: Optional[float] = typer.Option(
        None, "--timeout", help="Seconds to wait for each centre's reply (default 900; 3600 for the hospital benchmark, "
                                "whose sources distil every --ipc best-of-5 from all of their data in one reply)."),
    benchmark: Optional[str] = typer.Option(None, "--benchmark", help="A benchmark study instead of --nodes/--trust: pcam-c17. Hospital centres (make-pcam-centres --hospitals): target alone, + Histo-DD per ipc, + Full per target, mean and 95% CI over --seeds (summary.md/csv/png); resumable: re-run the same command with the same --out and the seeds a killed run finished are reused (the summary so far is written after every study). Two-centre folder (--target-domain): C2 alone, + Histo-DD per ipc, + Herding, + Full, stain ablations; mean ± std."),
    centres: Optional[Path] = typer.Option(None, "--centres", help="With --benchmark: the folder make-pcam-centres wrote."),
    seeds: int = typer.Option(3, "--seeds", help="With --benchmark: seeds 0..N-1."),
    workers: Optional[int] = typer.Option(None, "--workers", help="With --benchmark and hospital centres: processes "
                                          "each source distils with (its best-of-K candidates at once) and the target "
                                          "fine-tunes its rows in (+ ipc, + Full side by side); one torch thread each, "
                                          "the sets and numbers do not change. Default: this machine's cores (at most "
                                          f"{MAX_DEFAULT_WORKERS}); 1 elsewhere."),
) -> None:
    """Run the C1<->C2 transfer study (paper Table 5) through Flower."""
    import json

    wait = DEFAULT_REPLY_TIMEOUT if timeout is None else timeout   # the hospital benchmark has its own default
    from histodd_fed.federation.hospital_benchmark import is_hospitals

    hospitals = benchmark is not None and centres is not None and is_hospitals(centres)
    workers = (default_workers() if hospitals else 1) if workers is None else workers
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if workers != 1 and benchmark is None:
        raise ConfigError("--workers is for --benchmark pcam-c17 with hospital centres (a deployed centre sets "
                          "'workers' in its own node config)")
    if benchmark is not None:
        from histodd_fed.federation.benchmark_study import run_benchmark
        from histodd_fed.federation.hospital_benchmark import (DEFAULT_PRESET, HOSPITALS_REPLY_TIMEOUT,
                                                               run_hospitals_benchmark)

        if centres is None:
            raise ConfigError("--benchmark needs --centres DIR (made by centre-node make-pcam-centres)")
        out = out or Path("results/transfer") / f"{benchmark}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        if benchmark == "pcam-c17" and hospitals:
            rep = run_hospitals_benchmark(centres, out, sources=sources, target=target, ipcs=_ipcs(ipc), seeds=seeds,
                                          run_study=run_study, preset=DEFAULT_PRESET if preset == "cpu" else preset,
                                          epochs=epochs, timeout=HOSPITALS_REPLY_TIMEOUT if timeout is None else timeout,
                                          runtime=runtime, benchmark=benchmark, workers=workers,
                                          say=typer.echo, command=" ".join(["coordinator"] + sys.argv[1:]))
            typer.echo((out / "summary.md").read_text())
            typer.echo(f"report: {out} (summary.md, summary.csv, summary_per_seed.csv, summary.png, report.json)")
            return
        if workers != 1:
            raise ConfigError("--workers is for the hospital benchmark (centres from make-pcam-centres --hospitals)")
        if sources is not None or target not in (None, "C2"):
            raise ConfigError(f"{centres}: a two-centre folder (C1 + C2); --sources/--target need hospital centres "
                              "(centre-node make-pcam-centres --hospitals 0,1,2,3,4)")
        rep = run_benchmark(centres, out, ipcs=_ipcs(ipc), seeds=seeds, run_study=run_study, benchmark=benchmark,
                            preset="pcam-c17" if preset == "cpu" else preset, epochs=epochs,
                            timeout=wait, runtime=runtime, say=typer.echo)
        from histodd_fed.federation.benchmark_study import markdown

        typer.echo(markdown(rep))
        typer.echo(f"report: {out}")
        return
    if sources is not None:
        raise ConfigError("--sources: with --benchmark pcam-c17 and hospital centres only")
    if nodes is None or trust is None:
        raise ConfigError("give --nodes and --trust (or --benchmark with --centres)")

    from histodd_fed.federation.coordinator import StudyConfig
    from histodd_fed.federation.study import write_report

    if runtime not in ("simulation", "deployment", "flwr-simulation"):
        raise ConfigError(f"--runtime must be simulation, flwr-simulation or deployment, not {runtime!r}")
    try:
        node_cfgs = json.loads(nodes.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{nodes}: unreadable node list ({exc})") from None
    out = out or Path("results/transfer") / datetime.now().strftime("%Y%m%d-%H%M%S")
    cfg = StudyConfig(source=source, target=target or "C2", ipcs=_ipcs(ipc), full=full, both_directions=both_directions,
                      fine_tune_epochs=epochs, seed=seed, preset=preset, reply_timeout=wait, identity_timeout=wait,
                      study_dir=out.resolve(), trust=trust.resolve(), runtime=runtime)
    outcome = run_study(cfg, node_cfgs)
    _print(outcome, write_report(cfg, outcome))


def run_study(cfg, node_cfgs: list[dict]):
    """Run ``cfg`` on the chosen runtime; returns the StudyOutcome."""
    if cfg.runtime == "simulation":
        from coordinator.server_app import run_simulation_study

        return run_simulation_study(cfg, node_cfgs)
    import json

    if cfg.runtime == "flwr-simulation":  # `flwr run` against our own simulation-mode SuperLink
        from histodd_fed.federation.local_simulation import run_flwr_simulation

        rc = dict(run_config_for(cfg), runtime="flwr-simulation")
        report_path = run_flwr_simulation(rc, node_cfgs, cfg.study_dir, timeout=cfg.reply_timeout * 3 + 300,
                                          say=lambda m: log.info("[study] %s", m))
        return _outcome_from_report(json.loads(report_path.read_text()))

    from histodd_fed.federation.app_release import release_app
    from histodd_fed.federation.app_trust import generate_app_key
    from histodd_fed.federation.centre import CentreConfig
    from histodd_fed.federation.deployment import Deployment

    # every party on this one machine: the local consortium signs the app in its own folder (a real
    # deployment: examples/deploy/, where the coordinator gets only the signed release)
    consortium = cfg.study_dir / "consortium"
    key = consortium / "app-key.pem"
    if not key.exists():
        generate_app_key(key)
    release = release_app(consortium / "release", key)
    with Deployment(cfg.study_dir / "deployment") as dep:
        dep.start_superlink()
        dep.use_release(release)
        for nc in node_cfgs:
            c = CentreConfig.from_node_config(nc)
            dep.add_supernode(c.centre_id, c.node_config_string())
        dep.run_app(run_config_for(cfg), timeout=cfg.reply_timeout * 3 + 300)
    report = json.loads((cfg.study_dir / "report.json").read_text())
    return _outcome_from_report(report)


def run_config_for(cfg) -> dict:
    """The Flower run config (``[tool.flwr.app.config]`` keys) describing ``cfg``."""
    return {"source": cfg.source, "target": cfg.target, "ipcs": ",".join(str(i) for i in cfg.ipcs),
            "full": cfg.full, "both-directions": cfg.both_directions, "fine-tune-epochs": cfg.fine_tune_epochs,
            "preset": cfg.preset, "seed": cfg.seed, "reply-timeout": cfg.reply_timeout,
            "identity-timeout": cfg.identity_timeout, "discovery-timeout": cfg.discovery_timeout,
            "study-dir": str(cfg.study_dir), "trust": str(cfg.trust), "runtime": "deployment",
            "extras": json.dumps(getattr(cfg, "extras", []) or []), "sources": ",".join(getattr(cfg, "sources", []) or [])}


def _outcome_from_report(report: dict):
    from histodd_fed.federation.coordinator import StudyOutcome
    from histodd_fed.federation.faults import Fault

    # the attestations (signed statements and bodies) travel on: the report rewritten from this
    # outcome must still verify (coordinator verify-report)
    return StudyOutcome(rows=report["raw_rows"], faults=[Fault(**f) for f in report["faults"]],
                        centres=report["centres"], messages=report["messages"], seconds=report["seconds"],
                        attestations=list(report.get("attestations") or []))


@app.command("verify-report")
def verify_report(
    report: Path = typer.Argument(..., help="A study's results folder (holding report.json), or report.json."),
    trust: Path = typer.Option(..., "--trust", help="Trust store holding the centres' public identities "
                               "(trust.json, or a key folder holding one): the reader's own, not the report's."),
) -> None:
    """Check every signed reply in REPORT against --trust and every number shown against the signed rows."""
    from histodd_fed.bundle.trust import TrustStore
    from histodd_fed.federation.report_verify import verify_report as check_report
    from histodd_fed.terminal import escape

    store = TrustStore.load(trust)
    if not store.centres:
        raise ConfigError(f"{trust}: trust store holds no centre identities")
    res = check_report(report, store)
    signers = ", ".join(f"{c} key {k}" for c, k in sorted(res.signers.items()))
    typer.echo(escape(f"OK: {report}: {res.rows} rows, {res.raw_rows} raw rows, {res.attestations} signed "
                      f"replies ({signers}) verified against {trust}; checked {', '.join(res.files)}"))


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-data"), "--out", help="Where demo slides, keys and work go."),
    preset: str = typer.Option("cpu", "--preset", help="tiny | cpu"),
    config: Path = typer.Option(Path("configs/demo.yaml"), "--config", help="Demo settings (YAML)."),
    runtime: str = typer.Option("flwr-simulation", "--runtime", help="flwr-simulation | deployment | simulation"),
    ipc: Optional[str] = typer.Option(None, "--ipc", help="Comma-separated images per class to transfer "
                                      "(default: the config's ipcs; use 2 with --preset tiny)."),
) -> None:
    """Two centres with differently stained demo slides, keys and trust, then the transfer study."""
    import json

    import yaml

    from histodd_fed.federation.coordinator import StudyConfig
    from histodd_fed.federation.enrol import enrol
    from histodd_fed.federation.presets import get_preset
    from histodd_fed.federation.study import write_report
    from histodd_fed.slides.demo import make_demo_centre

    settings = yaml.safe_load(config.read_text()) if config.exists() else {}
    settings = settings or {}
    p = get_preset(preset)
    out = out.resolve()
    data = {}
    per_centre = settings.get("per_centre") or {}
    for i, cid in enumerate(settings.get("centres", ["C1", "C2"])):
        d = out / cid / "slides"
        manifest = d / "slides.csv"
        opts = {"n_slides": int(settings.get("slides", p.demo_slides)), "test_fraction": 0.3,
                "tumour_contrast": float(settings.get("tumour_contrast", 1.0)),
                "tumour_size": float(settings.get("tumour_size", 1.0)),
                "tumour_regions": int(settings.get("tumour_regions", 3))}
        extra = per_centre.get(cid) or {}
        bad = set(extra) - {"slides", "test_fraction", "tumour_contrast", "tumour_size", "tumour_regions"}
        if bad:
            raise ConfigError(f"{config}: per_centre.{cid}: unknown key(s) {sorted(bad)}")
        opts.update({("n_slides" if k == "slides" else k): v for k, v in extra.items()})
        if not manifest.exists():
            typer.echo(f"making demo slides for {cid} in {d}")
            manifest = make_demo_centre(d, centre=cid, seed=int(settings.get("seed", 0)) + i, **opts)
        data[cid] = manifest
    from histodd_fed.federation.enrol import policy_from_settings

    # each centre's own export policy (the "Full" row needs the source's explicit export_real)
    policies = {cid: policy_from_settings(p) for cid, p in (settings.get("centre_policy") or {}).items()}
    cfgs, trust = enrol(out, data, preset=preset, seed=int(settings.get("seed", 0)), policies=policies)
    node_cfgs = [c.to_node_config() for c in cfgs]
    (out / "nodes.json").write_text(json.dumps(node_cfgs, indent=2) + "\n")
    cfg = StudyConfig(source=settings.get("source", "C1"), target=settings.get("target", "C2"),
                      ipcs=[int(i) for i in (ipc.split(",") if ipc else settings.get("ipcs", [10]))], full=bool(settings.get("full", True)),
                      both_directions=bool(settings.get("both_directions", False)),
                      fine_tune_epochs=int(settings.get("fine_tune_epochs", p.fine_tune_epochs)),
                      seed=int(settings.get("seed", 0)), preset=preset, study_dir=out / "results" / f"transfer-{preset}",
                      trust=trust, runtime=runtime, reply_timeout=float(settings.get("timeout", 1200)),
                      identity_timeout=float(settings.get("timeout", 1200)))
    outcome = run_study(cfg, node_cfgs)
    _print(outcome, write_report(cfg, outcome, command="coordinator demo"))


def main() -> None:
    try:
        app()
    except HistoddError as exc:
        logging.getLogger("coordinator").debug("error", exc_info=True)
        from histodd_fed.terminal import error_line

        typer.echo(error_line(exc), err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
