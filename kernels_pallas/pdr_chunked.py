"""Chunked PDR recurrence as a Pallas kernel (SPEC §3.1, §3.4).

Same math and shapes as `kernels_pallas.pdr_xla.pdr_chunked`:
log_decay, v [B, T, d]; k, q [B, T, r]; state [B, d, r] → (y [B, T, d], S_T).

The rows of S evolve independently (decay is per row), so the grid is
(batch, row-blocks of `block_d`); each program carries its [block_d, r] slice of
the state through the chunks in a loop, forming the c×c pairwise decays of one
chunk at a time (every exponential ≤ 1). Reverse mode goes through
`jax.custom_vjp`: the backward pass is the VJP of the XLA chunked form
(gridded `pallas_call` has no autodiff rule).

`pdr_pallas` is the differentiable kernel; which implementation runs is decided
once, by `kernels_pallas.pdr_scan` (on CPU the kernel runs with `interpret=True`,
for tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.pdr_xla import pdr_chunked
HIGHEST = jax.lax.Precision.HIGHEST  # float32 dots (Triton would otherwise use tf32)


def _kernel(lam_ref, k_ref, q_ref, v_ref, s0_ref, y_ref, s_ref, *, chunk: int, n_chunks: int):
    """Refs (batch dim squeezed): lam, v [T, bd]; k, q [T, r]; s0, s [bd, r]; y [T, bd]."""
    row = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    lower = (row >= col).astype(jnp.float32)       # prefix sums as a dot (no Triton cumsum)
    causal = (row >= col)[:, :, None]

    def body(c, state):
        rows = pl.ds(c * chunk, chunk)
        lam, v = lam_ref[rows, :], v_ref[rows, :]
        k, q = k_ref[rows, :], q_ref[rows, :]
        cum = jnp.dot(lower, lam, precision=HIGHEST)                   # [c, bd] ≤ 0
        last = jnp.sum(lam, axis=0)                                    # = cum[-1]
        diff = cum[:, None, :] - cum[None, :, :]                       # [t, s, bd]
        pair = jnp.exp(jnp.where(causal, diff, -jnp.inf))
        scores = jnp.dot(q, k.T, precision=HIGHEST)                    # [t, s]
        y = jnp.sum(scores[:, :, None] * pair * v[None, :, :], axis=1)
        y = y + jnp.exp(cum) * jnp.dot(q, state.T, precision=HIGHEST)   # [c, bd]
        y_ref[rows, :] = y
        to_end = jnp.exp(last[None, :] - cum) * v
        return jnp.exp(last)[:, None] * state + jnp.dot(to_end.T, k, precision=HIGHEST)

    s_ref[...] = jax.lax.fori_loop(0, n_chunks, body, s0_ref[...])


@functools.partial(jax.jit, static_argnames=("chunk", "block_d", "interpret"))
def pdr_chunked_pallas(log_decay, k, q, v, state, chunk: int = 16, block_d: int = 128,
                       interpret: bool = False):
    b, t, d = v.shape
    r = k.shape[-1]
    pad = (-t) % chunk
    if pad:  # decay 1 and zero updates leave the state untouched
        widths = ((0, 0), (0, pad), (0, 0))
        log_decay, k, q, v = (jnp.pad(a, widths) for a in (log_decay, k, q, v))
    tp = t + pad
    bd = min(block_d, d)
    if d % bd:
        raise ValueError(f"d={d} is not divisible by block_d={bd}")
    f32 = jnp.float32
    row_spec = pl.BlockSpec((None, tp, bd), lambda i, j: (i, 0, j))
    key_spec = pl.BlockSpec((None, tp, r), lambda i, j: (i, 0, 0))
    state_spec = pl.BlockSpec((None, bd, r), lambda i, j: (i, j, 0))
    y, s = pl.pallas_call(
        functools.partial(_kernel, chunk=chunk, n_chunks=tp // chunk),
        out_shape=(jax.ShapeDtypeStruct((b, tp, d), f32), jax.ShapeDtypeStruct((b, d, r), f32)),
        grid=(b, d // bd),
        in_specs=[row_spec, key_spec, key_spec, row_spec, state_spec],
        out_specs=(row_spec, state_spec),
        interpret=interpret,
    )(log_decay.astype(f32), k.astype(f32), q.astype(f32), v.astype(f32), state.astype(f32))
    return y[:, :t], s


def _make_custom_vjp(chunk: int, block_d: int, interpret: bool):
    @jax.custom_vjp
    def fn(log_decay, k, q, v, state):
        return pdr_chunked_pallas(log_decay, k, q, v, state, chunk=chunk, block_d=block_d,
                                  interpret=interpret)

    def fwd(*args):
        return fn(*args), args

    def bwd(args, cotangents):
        _, vjp = jax.vjp(functools.partial(pdr_chunked, chunk=chunk), *args)
        return vjp(cotangents)

    fn.defvjp(fwd, bwd)
    return fn


def pdr_pallas(log_decay, k, q, v, state, *, chunk: int = 16, block_d: int = 128,
               interpret: bool = False):
    """Differentiable chunked PDR through the Pallas kernel (backward: the XLA form's VJP)."""
    return _make_custom_vjp(chunk, block_d, interpret)(log_decay, k, q, v, state)
