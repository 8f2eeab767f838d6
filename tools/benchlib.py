"""Shared helpers of the benchmark scripts in tools/."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def median_ms(fn, args, repeats: int) -> float:
    """Warm up once (compiling), then the median wall time in ms of `repeats` calls."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def add_shakespeare_args(parser: argparse.ArgumentParser, budget_s: float) -> None:
    """--config / --data / --budget-s / overrides shared by the TinyShakespeare benches."""
    parser.add_argument("--config", default=os.path.join(REPO, "curricula",
                                                         "shakespeare-char.yaml"))
    parser.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data",
                                                       "tinyshakespeare.txt"))
    parser.add_argument("--budget-s", type=float, default=budget_s)
    parser.add_argument("overrides", nargs="*")


def load_shakespeare_config(args):
    """The bench config, or None (after a one-line error) if the corpus is missing."""
    from perspective_jax.config import load_config
    if not os.path.isfile(args.data):
        print(f"error: corpus not found: {args.data} (pass --data)", file=sys.stderr)
        return None
    return load_config(args.config, args.overrides)


def matmul_peak_gflops(size: int = 2048, repeats: int = 10, dtype=None) -> float:
    """Measured matmul throughput of this machine's default device (XLA; float32
    unless `dtype`), the denominator of the benchmarks' MFU."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype or jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2 * size ** 3 * repeats / (time.perf_counter() - t0) / 1e9
