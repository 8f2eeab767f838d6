"""Packed ternary matmul vs dense float32 on this machine (issue 5 measurement).

For each weight shape (K → N) and batch size, times `ternary_matmul` (2-bit
codes read directly, XLA path on CPU / Pallas on GPU) against a dense float32
`x @ W`, jit-compiled, warm, median of --repeats; reports weight bytes of each.
Also prints the bytes of one expert-layer (3 × d_model × d_ff weights) of a
config in every storage format.

    .venv/bin/python tools/bench_ternary.py [--config curricula/perspective-1t.yaml]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from perspective_jax.cli.allocator import ensure_fast_allocator  # noqa: E402

if __name__ == "__main__":
    ensure_fast_allocator()         # before JAX starts (cli/allocator.py)

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchlib import median_ms  # noqa: E402
from kernels_pallas.ternary_matmul import pack_rows_2bit, ternary_matmul  # noqa: E402
from perspective_jax.config import load_config  # noqa: E402

SHAPES = ((2048, 2048), (4096, 4096), (4096, 11008))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,4,64")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--config", default=os.path.join(REPO, "curricula", "perspective-1t.yaml"))
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__} on {jax.default_backend()}\n")
    print("| K → N | batch | dense f32 ms | ternary 2-bit ms | speed-up | f32 MB | 2-bit MB | base-3 MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for k, n in SHAPES:
        trits = rng.integers(-1, 2, (k, n)).astype(np.int8)
        w = jnp.asarray(trits.astype(np.float32) * 0.02)
        packed = jnp.asarray(pack_rows_2bit(trits))
        dense = jax.jit(lambda x, w: x @ w)
        tern = jax.jit(lambda x, p: ternary_matmul(x, p, 0.02))
        for b in map(int, a.batches.split(",")):
            x = jnp.asarray(rng.normal(size=(b, k)).astype(np.float32))
            t_d, t_t = median_ms(dense, (x, w), a.repeats), median_ms(tern, (x, packed), a.repeats)
            print(f"| {k} → {n} | {b} | {t_d:.2f} | {t_t:.2f} | {t_d / t_t:.2f}x "
                  f"| {k * n * 4 / 1e6:.1f} | {packed.nbytes / 1e6:.1f} "
                  f"| {math.ceil(k * n / 5) / 1e6:.1f} |")
    cfg = load_config(a.config)
    weights = 3 * cfg.model.d_model * cfg.model.d_ff
    print(f"\none expert-layer of {cfg.name}: 3 × {cfg.model.d_model} × {cfg.model.d_ff} = "
          f"{weights / 1e6:.1f}M weights")
    for name, nbytes in (("float32", 4 * weights), ("bfloat16", 2 * weights),
                         ("2-bit codes", math.ceil(weights / 4)),
                         ("base-3, 5 trits/byte", math.ceil(weights / 5))):
        print(f"  {name:22s} {nbytes / 1e6:10.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
