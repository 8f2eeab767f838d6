"""Ternary matmul reading 2-bit packed weights directly (SPEC §3.4).

    y = x @ (T · scale),   T ∈ {−1, 0, +1}^{K×N}

Weights are packed along K, four rows per byte: ``packed[k4, n] =
Σ_i (T[4·k4 + i, n] + 1) << 2i`` (`pack_rows_2bit`). Accumulation is float32.

One call, four implementations (RecurrentGemma-style selection by backend and
row count; the choice on a GPU is measured, docs/benchmarks.md "Accelerator"):
* ``pallas``  — a Pallas kernel over (M, N) blocks that loops over K, decodes
                the codes in registers and accumulates x·T at float32; on a GPU
                the path for fewer than `DEQUANT_MIN_ROWS` rows (decode).
* ``dequant`` — decode the codes to float32, then XLA matmuls at the platform's
                default precision, in blocks of packed rows so the float
                temporary stays near `DEQUANT_BLOCK_BYTES`; on a GPU the path for
                many rows (prefill), where the matmul units win over
                in-register decode.
* ``xla``     — a loop over blocks of packed rows that decodes each block with
                shifts and masks, fused into the multiply-add for few rows (row by
                row) or to a float32 block and a matmul for many; the CPU path.
* ``reference`` — like ``dequant`` at HIGHEST precision (tests).
The Pallas kernel also runs on CPU with ``interpret=True`` (slow; correctness).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

IMPLS = ("pallas", "dequant", "xla", "reference")


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


def _decode(packed):
    """[K4, N] codes → [4·K4, N] float32 trits (row 4·k4 + i from bits 2i of row k4)."""
    k4, n = packed.shape
    phases = [((packed >> (2 * i)) & 3).astype(jnp.float32) - 1.0 for i in range(4)]
    return jnp.stack(phases, axis=1).reshape(4 * k4, n)


DEQUANT_BLOCK_BYTES = 16 << 20     # float32 weights one dequant step may decode


def ternary_matmul_dequant(x, packed, scale, block_bytes: int = DEQUANT_BLOCK_BYTES):
    """Decode codes to float32 and multiply at the platform's default precision: in
    one step when the whole [K, N] float matrix fits `block_bytes`, else a loop over
    blocks of packed rows (`_blocked_loop`), so the temporary stays near `block_bytes`
    however large the expert (at d 4096, d_ff 11008 one matrix would be 172 MiB).
    Blocks are decoded to trits (no row-sum correction), so a matmul that rounds its
    inputs (TF32 on a GPU) rounds x once, as the one-step path does."""
    x = x.astype(jnp.float32)
    k4, n = packed.shape
    if 16 * k4 * n <= block_bytes:
        return jnp.dot(x, _decode(packed)[: x.shape[1]]) * scale
    trits = functools.partial(_dot_step, offset=1.0)
    return _blocked_loop(x, packed, trits, max(1, block_bytes // (16 * n)),
                         codes_are_offset=False) * scale


def ternary_matmul_reference(x, packed, scale):
    return jnp.dot(x.astype(jnp.float32), _decode(packed)[: x.shape[1]],
                   precision=jax.lax.Precision.HIGHEST) * scale


def _tree_sum(terms):
    """Pairwise sum (a balanced add tree vectorises and rounds better than a chain)."""
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i]
                 for i in range(0, len(terms), 2)]
    return terms[0]


def _fused_step(xb, codes):
    """xb [M, 4·bk], codes [bk, N] → Σ_k xb[:, k]·code_k: one elementwise fusion over N
    that decodes every byte in registers (no float weight is written to memory)."""
    return _tree_sum([xb[:, 4 * j + i, None] * ((codes[j] >> 2 * i) & 3).astype(jnp.float32)
                      for j in range(codes.shape[0]) for i in range(4)])


def _dot_step(xb, codes, offset: float = 0.0):
    """xb [M, 4·bk], codes [bk, N] → xb @ (codes − offset) decoded to a [4·bk, N] float32
    block; offset 1 multiplies by the trits themselves."""
    shifts = (2 * jnp.arange(4, dtype=jnp.uint8))[None, :, None]
    w = ((codes[:, None, :] >> shifts) & 3).astype(jnp.float32) - offset
    return xb @ w.reshape(-1, codes.shape[1])


def _blocked_loop(x, packed, step, bk: int, codes_are_offset: bool = True):
    """Σ over blocks of ``bk`` packed rows (4·bk rows of K) of step(x block, code block)
    in a loop with a [M, N] accumulator. With `codes_are_offset` the steps multiply by
    codes = trit + 1, so x·T = x·codes − Σx; otherwise they multiply by trits."""
    k4, n = packed.shape
    m, k = x.shape
    nb = -(-k4 // bk)
    x = jnp.pad(x, ((0, 0), (0, 4 * nb * bk - k)))               # padded x is zero, so
    codes = jnp.pad(packed, ((0, nb * bk - k4), (0, 0))).reshape(nb, bk, n)  # any code
    xb = jnp.transpose(x.reshape(m, nb, 4 * bk), (1, 0, 2))     # [nb, M, 4·bk]
    acc = jax.lax.fori_loop(0, nb, lambda b, acc: acc + step(xb[b], codes[b]),
                            jnp.zeros((m, n), jnp.float32))
    return acc - x.sum(1, keepdims=True) if codes_are_offset else acc


def ternary_matmul_xla(x, packed, scale, fused_max_rows: int = 4, fused_block: int = 32,
                       dot_block: int = 64):
    """CPU path. Up to ``fused_max_rows`` rows (decode): each row on its own, the codes
    decoded inside one elementwise fusion (``_fused_step``, blocks of ``fused_block``
    packed rows) — reads the bytes once, writes no float weight. More rows: each block of
    ``dot_block`` packed rows decoded to float32 once, then a matmul (``_dot_step``)."""
    x = x.astype(jnp.float32)
    if x.shape[0] <= fused_max_rows:
        rows = [_blocked_loop(x[r:r + 1], packed, _fused_step, fused_block)
                for r in range(x.shape[0])]
        return jnp.concatenate(rows) * scale
    return _blocked_loop(x, packed, _dot_step, dot_block) * scale


def _kernel(x_ref, w_ref, o_ref, *, block_k: int, n_k: int):
    """x_ref [4, bm, K4p] f32, w_ref [K4p, bn] uint8 → o_ref [bm, bn] f32, looping over
    K in blocks of ``block_k`` packed rows (4·block_k inputs): decode each code block in
    registers, accumulate four phase dots. Every loaded tile is [bm|block_k, block_k|bn]
    (powers of two, as Triton needs); dots at HIGHEST precision (no tf32 rounding)."""

    def body(kb, acc):
        rows = pl.ds(kb * block_k, block_k)
        codes = w_ref[rows, :].astype(jnp.int32)
        for i in range(4):
            trit = (((codes >> (2 * i)) & 3) - 1).astype(jnp.float32)
            acc += jnp.dot(x_ref[i, :, rows], trit, precision=jax.lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)
        return acc

    o_ref[...] = jax.lax.fori_loop(0, n_k, body, jnp.zeros(o_ref.shape, jnp.float32))


def _block(n: int, cap: int, floor: int) -> int:
    """Smallest power of two ≥ n, clipped to [floor, cap] (cap a power of two)."""
    p = floor
    while p < n and p * 2 <= cap:
        p *= 2
    return p


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "interpret"))
def ternary_matmul_pallas(x, packed, scale, block_m: int = 64, block_n: int = 128,
                          block_k: int = 32, interpret: bool = False):
    """Blocks: rows padded to a power of two ≥ MIN_DOT (Triton dots need 16), N to
    ``block_n``, packed K rows to ``block_k`` (padding codes are zero trits)."""
    m = x.shape[0]
    k4, n = packed.shape
    bm = _block(m, block_m, MIN_DOT)
    bn = _block(n, block_n, MIN_DOT)
    bk = _block(k4, block_k, MIN_DOT)
    pad_m, pad_n, pad_k = (-m) % bm, (-n) % bn, (-k4) % bk
    xs = jnp.pad(_x_by_phase(x.astype(jnp.float32), k4), ((0, 0), (0, pad_m), (0, pad_k)))
    w = jnp.pad(packed, ((0, pad_k), (0, pad_n)), constant_values=0b01010101)  # zero trits
    k4p = k4 + pad_k
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=bk, n_k=k4p // bk),
        out_shape=jax.ShapeDtypeStruct((m + pad_m, n + pad_n), jnp.float32),
        grid=((m + pad_m) // bm, (n + pad_n) // bn),
        in_specs=[pl.BlockSpec((4, bm, k4p), lambda i, j: (0, i, 0)),
                  pl.BlockSpec((k4p, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        interpret=interpret,
    )(xs, w)
    return out[:m, :n] * scale


# Smallest dot operand dimension on GPU (Triton); the kernel pads rows up to it.
MIN_DOT = 16
# On a GPU, rows from which decode-then-matmul beats the Pallas kernel (H100: the
# kernel is 0.17 ms at 1 row and 1.8 ms at 64 rows for 4096→11008, dequant 0.15).
DEQUANT_MIN_ROWS = 16
# Pallas output-column block for few rows: narrow blocks give enough programs to
# fill the GPU when M is 1 (N / block_n programs).
SMALL_M_BLOCK_N = 32


def default_impl(rows: int) -> str:
    """xla on CPU; on GPU/TPU pallas below DEQUANT_MIN_ROWS rows, else dequant."""
    if jax.default_backend() == "cpu":
        return "xla"
    return "pallas" if rows < DEQUANT_MIN_ROWS else "dequant"


def ternary_matmul(x, packed, scale, impl: str = "auto", interpret: Optional[bool] = None):
    """x [M, K] float, packed [ceil(K/4), N] uint8, scale scalar or [N] → [M, N] f32.
    ``interpret`` (Pallas only) defaults to True on CPU, the only way it runs there."""
    if x.ndim != 2 or packed.ndim != 2 or -(-x.shape[1] // 4) != packed.shape[0]:
        raise ValueError(f"shapes do not match: x {x.shape}, packed {packed.shape} "
                         "(packed must be [ceil(K/4), N])")
    impl = default_impl(x.shape[0]) if impl == "auto" else impl
    if impl == "pallas":
        block_n = SMALL_M_BLOCK_N if x.shape[0] < DEQUANT_MIN_ROWS else 128
        if interpret is None:
            interpret = jax.default_backend() == "cpu"
        return ternary_matmul_pallas(x, packed, scale, block_n=block_n, interpret=interpret)
    if impl == "dequant":
        return ternary_matmul_dequant(x, packed, scale)
    if impl == "xla":
        return ternary_matmul_xla(x, packed, scale)
    if impl == "reference":
        return ternary_matmul_reference(x, packed, scale)
    raise ValueError(f"unknown implementation {impl!r}; use one of {IMPLS} or 'auto'")
