"""Time a jitted function by back-to-back calls (experiments only)."""

from __future__ import annotations

import statistics
import time

import jax


def us_per_call(fn, *args, calls: int = 20, reps: int = 5) -> float:
    """Median over `reps` runs of `calls` back-to-back calls of fn(*args), one block per run, in
    microseconds per call (after one call to compile and warm up)."""
    jax.block_until_ready(fn(*args))
    runs = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        runs.append((time.perf_counter() - start) / calls)
    return 1e6 * statistics.median(runs)
