"""Ternary matmul reading 2-bit packed weights directly (SPEC §3.4).

    y = x @ (T · scale),   T ∈ {−1, 0, +1}^{K×N}

Weights are packed along K, four rows per byte: ``packed[k4, n] =
Σ_i (T[4·k4 + i, n] + 1) << 2i`` (`pack_rows_2bit`). Accumulation is float32.

One call, three implementations (RecurrentGemma-style selection):
* ``pallas``  — a Pallas kernel over (M, N) blocks that decodes the codes in
                registers and accumulates x·T; chosen on GPU/TPU.
* ``xla``     — decode through a 256-entry lookup table to int8, float32 dot;
                the fast path on CPU.
* ``reference`` — unpack with shifts, dense float32 matmul (tests).
The Pallas kernel also runs on CPU with ``interpret=True`` (slow; correctness).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from perspective_jax.ternary.packing import LUT_2BIT

IMPLS = ("pallas", "xla", "reference")


def pack_rows_2bit(trits) -> np.ndarray:
    """[K, N] trits → [ceil(K/4), N] uint8 (K padded with zero trits)."""
    t = np.asarray(trits, np.int8)
    k, n = t.shape
    pad = (-k) % 4
    codes = (np.concatenate([t, np.zeros((pad, n), np.int8)]) + 1).astype(np.uint8)
    codes = codes.reshape(-1, 4, n)
    return (codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)).astype(
        np.uint8)


def _x_by_phase(x, k4):
    """x [M, K] → [4, M, K/4]: phase i holds columns i, i+4, … (matching the packing)."""
    m, k = x.shape
    x = jnp.pad(x, ((0, 0), (0, 4 * k4 - k)))
    return jnp.transpose(x.reshape(m, k4, 4), (2, 0, 1))


def ternary_matmul_reference(x, packed, scale):
    k4, n = packed.shape
    phases = [((packed >> (2 * i)) & 3).astype(jnp.float32) - 1.0 for i in range(4)]
    w = jnp.stack(phases, axis=1).reshape(4 * k4, n)[: x.shape[1]]
    return jnp.dot(x.astype(jnp.float32), w) * scale


def ternary_matmul_xla(x, packed, scale, lut_max_rows: int = 8):
    """CPU path. Few rows (decode): table lookup per packed byte (T-MAC style):
    P[m, g, c] = Σ_i x[m, 4g+i]·trit_i(c) for all 256 codes c, then
    y[m, n] = Σ_g P[m, g, packed[g, n]] — no weight is ever decoded. Many rows:
    decode the codes through the lookup table to float32 and use one matmul."""
    k4, n = packed.shape
    m, k = x.shape
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, 4 * k4 - k)))
    lut = jnp.asarray(LUT_2BIT, jnp.float32)                 # [256, 4]
    if m <= lut_max_rows:
        partial = x.reshape(m, k4, 4) @ lut.T                # [M, K/4, 256]
        idx = packed.astype(jnp.int32)
        rows = [jnp.take_along_axis(partial[i], idx, axis=1).sum(0) for i in range(m)]
        return jnp.stack(rows) * scale
    w = lut[packed]                                          # [K/4, N, 4]
    w = jnp.transpose(w, (0, 2, 1)).reshape(4 * k4, n)
    return jnp.dot(x, w) * scale


def _kernel(x_ref, w_ref, o_ref):
    """x_ref [4, bm, K/4] f32, w_ref [K/4, bn] uint8 → o_ref [bm, bn] f32."""
    codes = w_ref[...].astype(jnp.int32)
    acc = jnp.zeros(o_ref.shape, jnp.float32)
    for i in range(4):
        trit = (((codes >> (2 * i)) & 3) - 1).astype(jnp.float32)
        acc += jnp.dot(x_ref[i], trit, preferred_element_type=jnp.float32)
    o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "interpret"))
def ternary_matmul_pallas(x, packed, scale, block_m: int = 64, block_n: int = 128,
                          interpret: bool = False):
    m = x.shape[0]
    k4, n = packed.shape
    bm, bn = min(block_m, m), min(block_n, n)
    pad_m, pad_n = (-m) % bm, (-n) % bn
    xs = jnp.pad(_x_by_phase(x.astype(jnp.float32), k4), ((0, 0), (0, pad_m), (0, 0)))
    w = jnp.pad(packed, ((0, 0), (0, pad_n)), constant_values=0b01010101)  # zero trits
    out = pl.pallas_call(
        _kernel,
        out_shape=jax.ShapeDtypeStruct((m + pad_m, n + pad_n), jnp.float32),
        grid=((m + pad_m) // bm, (n + pad_n) // bn),
        in_specs=[pl.BlockSpec((4, bm, k4), lambda i, j: (0, i, 0)),
                  pl.BlockSpec((k4, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        interpret=interpret,
    )(xs, w)
    return out[:m, :n] * scale


def default_impl() -> str:
    return "xla" if jax.default_backend() == "cpu" else "pallas"


def ternary_matmul(x, packed, scale, impl: str = "auto", interpret: bool = False):
    """x [M, K] float, packed [ceil(K/4), N] uint8, scale scalar or [N] → [M, N] f32."""
    if x.ndim != 2 or packed.ndim != 2 or -(-x.shape[1] // 4) != packed.shape[0]:
        raise ValueError(f"shapes do not match: x {x.shape}, packed {packed.shape} "
                         "(packed must be [ceil(K/4), N])")
    impl = default_impl() if impl == "auto" else impl
    if impl == "pallas":
        return ternary_matmul_pallas(x, packed, scale, interpret=interpret)
    if impl == "xla":
        return ternary_matmul_xla(x, packed, scale)
    if impl == "reference":
        return ternary_matmul_reference(x, packed, scale)
    raise ValueError(f"unknown implementation {impl!r}; use one of {IMPLS} or 'auto'")
