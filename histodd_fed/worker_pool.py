"""Independent jobs in spawned worker processes: best-of-K candidates (``distill/select.py``) and LiRA
shadows (``privacy/lira_shadows.py``).

``spawn`` (not fork) so a worker starts clean inside any host process (a Flower ClientApp's Ray actor, a
CLI that already holds torch threads); each worker runs with one torch thread unless its initializer
says otherwise, so its numbers equal a one-process run with one thread. Each result reaches the caller
as soon as its job finishes (to checkpoint it, tick a bar); the first error cancels the jobs not started.
Every pool here is :func:`spawn_pool`: its workers die with the process that started them, and an error or
an interrupt (Ctrl-C, ``kill``) kills the running jobs instead of waiting for them (:mod:`histodd_fed.process_tree`).
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from typing import Any, Callable, Hashable, Iterator, Mapping

from histodd_fed.errors import HistoddError
from histodd_fed.process_tree import die_with_parent, stop_pool


def one_torch_thread() -> None:
    """Worker start: one torch thread (and the malloc settings of :mod:`histodd_fed.allocator`)."""
    import torch

    from histodd_fed.allocator import keep_freed_memory

    keep_freed_memory()

    torch.set_num_threads(1)


def _start_worker(initializer: Callable[..., None] | None, initargs: tuple) -> None:
    die_with_parent()
    if initializer is not None:
        initializer(*initargs)


@contextmanager
def spawn_pool(workers: int, *, initializer: Callable[..., None] | None = one_torch_thread,
               initargs: tuple = ()) -> Iterator[ProcessPoolExecutor]:
    """A ``spawn`` process pool of ``workers`` whose workers die with this process; leaving the block by an
    exception (KeyboardInterrupt and SystemExit included) kills its running jobs, a normal exit waits for them."""
    pool = ProcessPoolExecutor(max_workers=max(1, int(workers)), initializer=_start_worker,
                               initargs=(initializer, initargs), mp_context=multiprocessing.get_context("spawn"))
    try:
        yield pool
    except BaseException:
        stop_pool(pool)
        raise
    pool.shutdown(wait=True)


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
    with spawn_pool(min(workers, len(jobs)), initializer=initializer, initargs=initargs) as pool:
        pending = {pool.submit(fn, *args): key for key, args in jobs.items()}
        while pending:   # an error or interrupt here: spawn_pool cancels the rest and kills the running jobs
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                key = pending.pop(f)
                on_result(key, result_of(f, name(key)))
