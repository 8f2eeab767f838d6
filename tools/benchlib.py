"""Shared helpers of the benchmark scripts in tools/."""

from __future__ import annotations

import statistics
import time

import jax


def median_ms(fn, args, repeats: int) -> float:
    """Warm up once (compiling), then the median wall time in ms of `repeats` calls."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
