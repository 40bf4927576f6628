"""glibc ``malloc`` settings that keep freed tensor memory for reuse instead of handing it back to the OS.

PyTorch on the CPU frees and re-allocates the same few-MB activation and gradient buffers every
training step. With glibc's defaults those blocks are returned to the kernel (``munmap``, heap
trimming) and every new step page-faults and zeroes them again: measured on the 2-core CPU, a
ConvNet-3 w32 fine-tune step (batch 32, 32 px) took 23.9 ms with 1.5 s of system time per 10 s, a
``--preset pcam`` distillation candidate 61 s wall with 19 s in the kernel. With the settings below
the same work takes 18.3 ms per step and 41 s (0.6 s in the kernel) for ~8% more peak memory
(docs/benchmarks.md "Allocator"). Arithmetic is untouched: every number a run produces is the same.

:func:`keep_freed_memory` applies them to this process (``mallopt``) and exports them for every process
started after it (spawned workers, Flower's simulation and its actors read ``MALLOC_*_`` at start). A
value the user already set in the environment wins; ``HISTODD_MALLOC=default`` leaves glibc's defaults (less
resident memory, the old speed). Not glibc (macOS, musl): nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameter numbers (glibc <malloc.h>)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3

#: ``HISTODD_MALLOC=default``: leave glibc's settings alone (benchmarks/bench_allocator.py measures both)
OPT_OUT = "HISTODD_MALLOC"
#: environment variable -> (mallopt parameter, value). Blocks below 32 MiB (glibc's largest mmap threshold)
#: come from the heap; free memory at the heap's top is kept up to 1 GiB; the heap grows 256 MiB at a time.
SETTINGS: dict[str, tuple[int, int]] = {
    "MALLOC_MMAP_THRESHOLD_": (_M_MMAP_THRESHOLD, 32 * 1024 * 1024),
    "MALLOC_TRIM_THRESHOLD_": (_M_TRIM_THRESHOLD, 1024 * 1024 * 1024),
    "MALLOC_TOP_PAD_": (_M_TOP_PAD, 256 * 1024 * 1024),
}


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError outside glibc
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> dict[str, int]:
    """Apply :data:`SETTINGS` here and export them to child processes; returns what this process now uses
    (empty outside glibc). Idempotent; a ``MALLOC_*_`` variable already in the environment is kept as is."""
    libc = _glibc()
    if libc is None or os.environ.get(OPT_OUT) == "default":
        return {}
    applied: dict[str, int] = {}
    for env, (param, default) in SETTINGS.items():
        raw = os.environ.get(env)
        try:
            value = int(raw) if raw is not None else default
        except ValueError:
            value = default
        if value < 0 or value > 2**31 - 1:  # mallopt takes a C int
            value = default
        os.environ.setdefault(env, str(value))
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:
            applied[env] = value
    return applied
