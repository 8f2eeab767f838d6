"""Dropless top-1 dispatch cost per implementation (issue 4 measurement).

For each `expert_swiglu` implementation (ragged = `jax.lax.ragged_dot`,
blocked = block-padded batched einsum, dense = every expert on every token),
times forward and forward+backward (grads w.r.t. x and all expert weights),
jit-compiled and warm, median of --repeats, with random top-1 routing.

    .venv/bin/python tools/bench_dispatch.py [--tokens 4096 --d 256 --d-ff 512 --experts 16]
"""

from __future__ import annotations

import argparse
import sys

from perspective_jax.cli.allocator import ensure_fast_allocator  # noqa: E402

if __name__ == "__main__":
    ensure_fast_allocator()         # before JAX starts (cli/allocator.py)

import jax
import jax.numpy as jnp

from benchlib import median_ms  # noqa: E402
from perspective_jax.moe.dispatch import IMPLS, expert_swiglu  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--block", type=int, default=128, help="block size of the blocked path")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--impls", default=",".join(IMPLS))
    a = p.parse_args(argv)
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (a.tokens, a.d))
    idx = jax.random.randint(keys[1], (a.tokens,), 0, a.experts)
    w = (jax.random.normal(keys[2], (a.experts, a.d, a.d_ff)) / a.d ** 0.5,
         jax.random.normal(keys[3], (a.experts, a.d, a.d_ff)) / a.d ** 0.5,
         jax.random.normal(keys[4], (a.experts, a.d_ff, a.d)) / a.d_ff ** 0.5)
    useful = 2 * 3 * a.tokens * a.d * a.d_ff                          # one expert per token
    print(f"jax {jax.__version__} on {jax.default_backend()}, tokens={a.tokens} d={a.d} "
          f"d_ff={a.d_ff} E={a.experts} block={a.block}\n")
    print("| dispatch | fwd ms | fwd+bwd ms | fwd useful GFLOP/s |")
    print("|---|---:|---:|---:|")
    for impl in a.impls.split(","):
        fwd = jax.jit(lambda x, *w, impl=impl: expert_swiglu(x, idx, *w, impl=impl,
                                                             block=a.block))
        loss = lambda x, *w, impl=impl: jnp.sum(expert_swiglu(x, idx, *w, impl=impl,
                                                              block=a.block) ** 2)
        bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        t_f, t_b = median_ms(fwd, (x, *w), a.repeats), median_ms(bwd, (x, *w), a.repeats)
        print(f"| {impl} | {t_f:.1f} | {t_b:.1f} | {useful / t_f / 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
