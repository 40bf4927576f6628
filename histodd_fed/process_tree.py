"""Processes a run starts end with the run: no worker keeps computing for a parent that is gone.

Three pieces, each used in one place:

- :func:`die_with_parent` - in a spawned worker (:mod:`histodd_fed.worker_pool` runs it first): the kernel
  kills the worker the moment the thread that started it ends, however it ends (``kill -9`` included).
  Linux (``prctl(PR_SET_PDEATHSIG)``); elsewhere a no-op (a worker then finishes its job, then sees its
  pipe closed and exits, as before).
- :func:`exit_on_sigterm` - the CLIs: ``kill PID`` (SIGTERM, what schedulers and ``timeout`` send) unwinds
  the main thread like Ctrl-C, so ``with`` blocks and ``finally`` clauses run: worker pools stopped, the
  simulation's SuperLink process group killed, temp files removed. Exit status 143 (128 + 15).
- :func:`stop_pool` - a process pool left by an error or an interrupt: jobs not started are cancelled and
  the running ones' processes killed, not waited for (``ProcessPoolExecutor.__exit__`` would wait for
  every running job to end, minutes for a distillation candidate).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor

_PR_SET_PDEATHSIG = 1   # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """In a child process: have the kernel send ``sig`` when its parent thread ends. Returns whether it is
    armed (False off Linux). A parent that died before the request was made ends this process at once."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:   # orphaned between spawn and prctl
        os.kill(os.getpid(), sig)
    return True


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def exit_on_sigterm() -> bool:
    """SIGTERM raises ``SystemExit(143)`` in the main thread (cleanup runs, as for Ctrl-C). Returns whether it
    was installed (only the main thread may; a handler someone else installed is kept)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        return False
    signal.signal(signal.SIGTERM, _raise_exit)
    return True


def stop_pool(pool: ProcessPoolExecutor, join_s: float = 5.0) -> None:
    """Cancel ``pool``'s jobs not started and kill the processes running the others (not waited for)."""
    # ProcessPoolExecutor has no public handle on its processes before Python 3.14 (terminate_workers)
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        try:
            p.kill()
        except (OSError, ValueError, AttributeError):
            pass
    for p in procs:
        try:
            p.join(join_s)
        except (OSError, ValueError, AssertionError):
            pass
    pool.shutdown(wait=True, cancel_futures=True)
