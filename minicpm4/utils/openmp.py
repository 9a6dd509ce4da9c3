"""Releasing the calling thread's idle OpenMP worker pool (issue 5: serving throughput).

Each thread that runs a parallel region (torch's intra-op parallelism on CPU) gets its own
OpenMP worker pool, kept for the thread's lifetime. The server loads the model on the main
thread, then decodes on the engine thread (`engine/async_engine.py`), so two pools exist.
With more OpenMP threads than cores, libgomp stops spinning and puts its workers to sleep
between parallel regions. Each region then pays a futex wake-up. Measured on this project's
2-core VM (`benchmarks/results/2026-11_cpu-2core_serve.md`):
- a small `index_select` on the engine thread took 63-81 us after the main thread had run
  parallel work, and 7 us with that pool released;
- a demo-model decode step was ~35% slower on a second thread than on the main thread.
`release_thread_pool()` frees the caller's pool (OpenMP 5.0 `omp_pause_resource_all`, soft:
the next parallel region of that thread simply starts a new one). Linux only; anywhere else,
or with a runtime that lacks the call, it does nothing and returns False.
"""

from __future__ import annotations

import ctypes
import functools
import sys

_OMP_PAUSE_SOFT = 1


@functools.lru_cache(maxsize=1)
def _pause_fn():
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f
                    if any(n in line for n in ("libgomp", "libiomp", "libomp"))}
    except OSError:
        return None
    for path in sorted(libs):
        try:
            fn = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    return None


def release_thread_pool() -> bool:
    """Free the calling thread's idle OpenMP workers; True when the runtime did so."""
    fn = _pause_fn()
    return fn is not None and fn(_OMP_PAUSE_SOFT) == 0
