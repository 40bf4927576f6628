"""Killing a run ends its worker processes: none keeps computing for a parent that is gone.

Each test starts a real parent process that hands two 120-s jobs to spawned workers
(:func:`histodd_fed.worker_pool.run_in_processes`), waits until both workers run, stops the parent
the way a user or a scheduler would (``kill -9``, ``kill``, Ctrl-C to the parent alone) and checks
that every worker is gone within seconds, not after its job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")

REPO = Path(__file__).resolve().parents[1]

PARENT = textwrap.dedent("""
    import signal, sys, time
    from histodd_fed.worker_pool import run_in_processes
    if sys.argv[1] == "cli":   # as the CLIs set up: SIGTERM unwinds like Ctrl-C
        from histodd_fed.process_tree import exit_on_sigterm
        exit_on_sigterm()
        # Ctrl-C as in a terminal, also when the suite runs in the background (where SIGINT is inherited ignored)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    print("ready", flush=True)
    run_in_processes(time.sleep, {0: (120,), 1: (120,)}, workers=2, on_result=lambda k, r: None)
""")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")   # a zombie no init reaps is gone as far as work goes


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _workers(pid: int) -> list[int]:
    found = []
    for c in _children(pid):
        try:
            cmd = Path(f"/proc/{c}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmd:   # a spawned worker (not the resource tracker)
            found.append(c)
    return found


def _start(mode: str) -> tuple[subprocess.Popen, list[int]]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-c", PARENT, mode], env=env, cwd=str(REPO), stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        w = _workers(p.pid)
        if len(w) == 2:
            time.sleep(2.0)   # both inside their job
            return p, w
        time.sleep(0.2)
    p.kill()
    raise AssertionError("the two workers did not start within 60 s")


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = [w for w in pids if _alive(w)]
        if not left:
            return []
        time.sleep(0.2)
    left = [w for w in pids if _alive(w)]
    for w in left:   # do not leave them behind for the rest of the suite
        try:
            os.kill(w, signal.SIGKILL)
        except OSError:
            pass
    return left


@pytest.fixture
def started():
    """``start(mode)`` -> (parent, workers); whatever is left is killed after the test."""
    procs: list[tuple[subprocess.Popen, list[int]]] = []

    def start(mode: str) -> tuple[subprocess.Popen, list[int]]:
        procs.append(_start(mode))
        return procs[-1]

    yield start
    for parent, workers in procs:
        parent.kill()
        parent.wait(10)
        _gone_within(workers, 0)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "kill"])
def test_workers_end_when_their_parent_is_killed(started, sig):
    parent, workers = started("bare")
    parent.send_signal(sig)
    parent.wait(10)
    assert _gone_within(workers, 10) == [], "workers kept running after their parent was killed"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill-cli"])
def test_interrupting_the_parent_stops_its_running_jobs_at_once(started, sig):
    parent, workers = started("cli")
    t0 = time.monotonic()
    parent.send_signal(sig)   # to the parent alone (not its process group)
    try:
        parent.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail("the parent waited for its workers' jobs to end")
    assert time.monotonic() - t0 < 15
    assert parent.returncode != 0
    assert _gone_within(workers, 10) == []
