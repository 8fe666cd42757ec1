"""Process memory and thread limits: BLAS threads, glibc malloc arenas, handing freed heap back to the OS.

In ``serving/`` because the one swap path (``swap.py``) releases memory after every model change and the sync
transfer (``fleet/``) after every download; ``ops/`` sets the limits at start-up.
"""
from __future__ import annotations

import ctypes
import ctypes.util

from threadpoolctl import threadpool_limits

from .. import const


def limit_blas_threads(n: int = const.BLAS_THREADS) -> None:
    """Cap BLAS threads (OpenBLAS / MKL, via threadpoolctl). The daemon runs requests in parallel scoring threads;
    BLAS spinning up its own threads per mat-vec on top of them costs more than it gains (bench_latency.py measured
    p99 10.4 ms -> 1.4 ms for one client on 2 cores)."""
    threadpool_limits(limits=n, user_api="blas")


def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else None


def limit_malloc_arenas(n: int = const.MALLOC_ARENAS) -> bool:
    """glibc only: at most ``n`` malloc arenas (mallopt M_ARENA_MAX; call before threads start). Each thread that
    allocates otherwise gets its own arena, and a model loaded in a worker thread during a hot swap would not reuse
    memory the event loop freed. Returns False where glibc is not there (musl, macOS)."""
    lib = _libc()
    return bool(lib and lib.mallopt(-8, n) == 1)   # -8 = M_ARENA_MAX


def release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; ctypes releases the GIL during the call). The
    hot swap calls it after a transfer (before loading the new model) and after dropping the old model, so neither
    the transfer's buffers nor the old model stack on top of the swap's peak RSS. No ``gc.collect()``: a model
    holds no reference cycles, and a full collection over a large session store would stall the event loop."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
