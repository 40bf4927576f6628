"""The centre's ClientApp launcher: runs only Flower app code this centre approved.

``flower-supernode --isolation process`` starts no app process itself; this launcher (run by the
centre next to its SuperNode) takes each task from the SuperNode's local Runtime API and starts
one ClientApp process per task, as Flower's own SuperExec would, with one difference: inside that
process the FAB is checked (:func:`histodd_fed.federation.app_trust.check_fab` against the
centre's ``app-trust.json``) BEFORE Flower unpacks, installs or imports anything from it, and the run's ``fab_id`` /
``fab_version`` / FAB hash (which name the folder Flower loads) must be those of the approved bytes
(:func:`~histodd_fed.federation.app_trust.check_run_binding`). An unapproved FAB or run gets an
error reply naming the FAB hash, and none of its code runs.

    python -m centre_node.app_guard launch --runtime-api-address 127.0.0.1:PORT --app-trust FILE --insecure

Only ClientApp tasks are taken; other task types are refused.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("centre_node.app_guard")


def _tls_args(args: argparse.Namespace) -> list[str]:
    if args.insecure:
        return ["--insecure"]
    return ["--root-certificates", args.root_certificates] if args.root_certificates else []


def launch(args: argparse.Namespace) -> None:
    """The task loop (Flower's SuperExec loop with a guarded ClientApp plugin)."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec import run_superexec as rs
    from flwr.supercore.superexec.executor import LaunchResult

    from histodd_fed.federation.app_trust import AppTrust

    AppTrust.load(args.app_trust)  # fail at start, not per task, on a bad trust file
    trust_file = str(Path(args.app_trust).resolve())

    class GuardedClientAppPlugin(rs.AutoExecPlugin):
        supported_task_types = frozenset({TaskType.CLIENT_APP})

        def launch_task(self, token, task):  # noqa: ANN001 - Flower's signature
            if self._get_supported_task_type(task) is None:
                return LaunchResult.failed(f"app guard runs ClientApp tasks only, not {task.type!r}")
            cmd = [sys.executable, "-m", "centre_node.app_guard", "clientapp", "--runtime-api-address",
                   self.runtime_api_address, "--token", token, "--app-trust", trust_file,
                   "--parent-pid", str(os.getpid())] + _tls_args(args)
            subprocess.Popen(cmd)  # noqa: S603 - our own module, fixed arguments
            return LaunchResult.accepted()

    rs.AutoExecPlugin = GuardedClientAppPlugin
    rs.run_superexec(runtime_api_address=args.runtime_api_address, insecure=args.insecure,
                     root_certificates_path=args.root_certificates, runtime_dependency_install=False)


def clientapp(args: argparse.Namespace) -> None:
    """One ClientApp task: Flower's ``flwr-clientapp`` with the FAB checked before it is installed.

    The check covers the bytes (pinned hash or consortium signature) AND the run's ``fab_id`` /
    ``fab_version`` / FAB hash, which name the folder Flower then loads the ClientApp from."""
    import flwr.supernode.runtime.run_clientapp as rc

    from histodd_fed.federation.app_trust import AppTrust, UnapprovedAppError, approve_run

    trust = AppTrust.load(args.app_trust)
    install, pull = rc.install_from_fab, rc.pull_task_input
    pulled: dict = {}

    def remembering_pull(client):  # noqa: ANN001, ANN202 - Flower's signature
        message, context, run, fab = pull(client)
        pulled.update(fab_id=run.fab_id, fab_version=run.fab_version, hash_str=fab.hash_str)
        return message, context, run, fab

    def guarded_install(fab_file, *a, **kw):  # noqa: ANN001, ANN202
        data = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        if not pulled:
            raise UnapprovedAppError("no run metadata to bind the FAB to")
        how = approve_run(data, trust, **pulled)  # raises UnapprovedAppError: Flower replies an error, runs nothing
        log.info("app guard: %s", how)
        return install(fab_file, *a, **kw)

    rc.pull_task_input = remembering_pull
    rc.install_from_fab = guarded_install
    certificates = Path(args.root_certificates).read_bytes() if args.root_certificates and not args.insecure else None
    rc.run_clientapp(runtime_api_address=args.runtime_api_address, token=args.token, insecure=args.insecure,
                     certificates=certificates, parent_pid=args.parent_pid, runtime_dependency_install=False)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m centre_node.app_guard", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("launch", "clientapp"):
        s = sub.add_parser(name)
        s.add_argument("--runtime-api-address", required=True)
        s.add_argument("--app-trust", required=True, help="the centre's app-trust.json")
        s.add_argument("--insecure", action="store_true", help="plain HTTP to the SuperNode's local Runtime API")
        s.add_argument("--root-certificates", default=None)
        s.add_argument("--parent-pid", type=int, default=None)
        if name == "clientapp":
            s.add_argument("--token", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    launch(args) if args.cmd == "launch" else clientapp(args)


if __name__ == "__main__":
    main()
