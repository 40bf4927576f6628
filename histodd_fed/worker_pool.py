"""Independent jobs in spawned worker processes: best-of-K candidates (``distill/select.py``) and LiRA
shadows (``privacy/lira_shadows.py``).

``spawn`` (not fork) so a worker starts clean inside any host process (a Flower ClientApp's Ray actor, a
CLI that already holds torch threads); each worker runs with one torch thread unless its initializer
says otherwise, so its numbers equal a one-process run with one thread. Each result reaches the caller
as soon as its job finishes (to checkpoint it, tick a bar); the first error cancels the jobs not started.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Callable, Hashable, Mapping

from histodd_fed.errors import HistoddError


def one_torch_thread() -> None:
    """Worker start: one torch thread (and the malloc settings of :mod:`histodd_fed.allocator`)."""
    import torch

    from histodd_fed.allocator import keep_freed_memory

    keep_freed_memory()

    torch.set_num_threads(1)


def result_of(future: Future, what: str) -> Any:
    """A worker's result: its :class:`HistoddError` as raised, any other error as a HistoddError naming ``what``."""
    try:
        return future.result()
    except HistoddError:
        raise
    except Exception as exc:  # noqa: BLE001 - a worker's crash, named
        raise HistoddError(f"{what} failed in its worker process ({type(exc).__name__}: {exc})") from exc


def run_in_processes(fn: Callable[..., Any], jobs: Mapping[Hashable, tuple], *, workers: int,
                     on_result: Callable[[Hashable, Any], None], name: Callable[[Hashable], str] = str,
                     initializer: Callable[..., None] = one_torch_thread, initargs: tuple = ()) -> None:
    """``fn(*args)`` for every ``key: args`` of ``jobs`` in ``workers`` spawned processes; ``on_result(key,
    result)`` in this process as each finishes. A job's error stops the run: a :class:`HistoddError` as
    raised, anything else as a HistoddError naming the job (``name(key)``)."""
    if not jobs:
        return
    with ProcessPoolExecutor(max_workers=max(1, min(workers, len(jobs))), initializer=initializer,
                             initargs=initargs, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(fn, *args): key for key, args in jobs.items()}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    key = pending.pop(f)
                    on_result(key, result_of(f, name(key)))
        except BaseException:
            for f in pending:
                f.cancel()
            raise
