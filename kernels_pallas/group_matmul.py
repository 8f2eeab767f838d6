"""Matmul reading group-wise quantised (GPTQ) weights without a float copy (SPEC §3.4).

    y = x @ Ŵ,   Ŵ[i, o] = (c[i, o] − z[g, o]) · s[g, o],   g = i // group_size
      = Σ_g s[g] ⊙ (Σ_{i∈g} x[i] c[i] − z[g] Σ_{i∈g} x[i])

Codes c < 2^bits are packed along the input axis, k = 8 // bits per byte:
``packed[r, o] = Σ_j c[k·r + j, o] << (bits·j)`` (`perspective_jax.quant.gptq.pack_codes`);
scales s and integer zero points z are [n_groups, out], float16 (as exported; float32
accepted), widened to float32 inside the loop.

Implementations (chosen per backend and row count by `default_impl`):
* ``xla``     — CPU. Up to ``fused_max_rows`` rows (decode): a loop over groups,
                each step one elementwise fusion per row that decodes the group's
                bytes in registers (reads 2–8 bits per weight, writes no float
                weight; one group per step measured fastest). More rows: blocks of
                ``DOT_BLOCK_ROWS`` inputs decoded to float32 once, then a matmul.
                At 2048 → 5504, one row, weights not in cache: 1.0 ms at 2 bits vs
                2.0 ms for the float32 matrix (docs/benchmarks.md).
* ``dequant`` — decode the whole matrix to float32, then one matmul at the
                platform's default precision (the accelerator path).
* ``reference`` — like ``dequant`` at HIGHEST precision (tests).
The block loop needs ``group_size % k == 0`` (every export default does); other
group sizes run ``dequant``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from kernels_pallas.ternary_matmul import _tree_sum

IMPLS = ("xla", "dequant", "reference")
DOT_BLOCK_ROWS = 1024        # input rows decoded per block on the many-row path (measured)


def _unpack(packed, bits: int, n_rows: int):
    """[R, N] packed → [n_rows, N] float32 codes (input row k·r + j from bits·j of row r)."""
    k, mask = 8 // bits, (1 << bits) - 1
    r, n = packed.shape
    parts = [((packed >> (bits * j)) & mask).astype(jnp.float32) for j in range(k)]
    return jnp.stack(parts, axis=1).reshape(r * k, n)[:n_rows]


def _dequantized(packed, scales, zeros, bits: int, group_size: int, n_in: int):
    g = jnp.arange(n_in) // group_size
    f32 = jnp.float32
    return (_unpack(packed, bits, n_in) - zeros[g].astype(f32)) * scales[g].astype(f32)


def group_matmul_dequant(x, packed, scales, zeros, bits: int, group_size: int):
    w = _dequantized(packed, scales, zeros, bits, group_size, x.shape[1])
    return jnp.dot(x.astype(jnp.float32), w)


def group_matmul_reference(x, packed, scales, zeros, bits: int, group_size: int):
    w = _dequantized(packed, scales, zeros, bits, group_size, x.shape[1])
    return jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)


def _grouped(x, packed, scales, zeros, bits: int, group_size: int, groups_per_block: int):
    """Pad to whole blocks of `groups_per_block` groups; returns x [nb, M, gpb·gs],
    codes [nb, gpb·gs/k, N], scales and zeros [nb, gpb, N]."""
    k = 8 // bits
    m, n_in = x.shape
    n_groups, n = scales.shape
    nb = -(-n_groups // groups_per_block)
    g_pad = nb * groups_per_block
    rows = g_pad * group_size
    x = jnp.pad(x, ((0, 0), (0, rows - n_in)))              # padded inputs are zero, so
    packed = jnp.pad(packed, ((0, rows // k - packed.shape[0]), (0, 0)))  # any code works
    scales = jnp.pad(scales, ((0, g_pad - n_groups), (0, 0)))
    zeros = jnp.pad(zeros, ((0, g_pad - n_groups), (0, 0)))
    xb = jnp.transpose(x.reshape(m, nb, groups_per_block * group_size), (1, 0, 2))
    return (xb, packed.reshape(nb, -1, n), scales.reshape(nb, groups_per_block, n),
            zeros.reshape(nb, groups_per_block, n))


def _fused_group(xg, xs, codes, s, z, bits: int):
    """One row, one group: xg [gs], xs = Σ xg, codes [gs/k, N], s, z [N] →
    s ⊙ (Σ_i xg[i] c_i − z·xs), the codes decoded in registers (one fusion over N)."""
    k, mask = 8 // bits, (1 << bits) - 1
    part = _tree_sum([xg[k * j + i] * ((codes[j] >> (bits * i)) & mask).astype(jnp.float32)
                      for j in range(codes.shape[0]) for i in range(k)])
    return s.astype(jnp.float32) * (part - z.astype(jnp.float32) * xs)


def _dot_block(xb, codes, s, z, bits: int):
    """xb [M, gpb·gs] @ the block's weights decoded to float32. Phase i of packed row j
    is input row k·j + i: decode phase-major [k, R, N] and permute x to match."""
    k, mask = 8 // bits, (1 << bits) - 1
    r, n = codes.shape
    rpg = r // s.shape[0]
    c = jnp.stack([((codes >> (bits * i)) & mask).astype(jnp.float32) for i in range(k)])
    s, z = s.astype(jnp.float32), z.astype(jnp.float32)
    w = (c.reshape(k, -1, rpg, n) - z[None, :, None]) * s[None, :, None]
    xp = jnp.transpose(xb.reshape(xb.shape[0], r, k), (0, 2, 1)).reshape(xb.shape[0], k * r)
    return xp @ w.reshape(k * r, n)


def group_matmul_xla(x, packed, scales, zeros, bits: int, group_size: int,
                     fused_max_rows: int = 4):
    x = x.astype(jnp.float32)
    n = scales.shape[1]
    if x.shape[0] <= fused_max_rows:              # decode: one group per loop step
        xb, cb, sb, zb = _grouped(x, packed, scales, zeros, bits, group_size, 1)
        xs = xb.sum(-1)                            # [G, M]
        rows = []
        for r in range(x.shape[0]):
            step = lambda g, acc, r=r: acc + _fused_group(  # noqa: E731
                xb[g, r], xs[g, r], cb[g], sb[g, 0], zb[g, 0], bits)
            rows.append(jax.lax.fori_loop(0, xb.shape[0], step, jnp.zeros((n,), jnp.float32)))
        return jnp.stack(rows)
    gpb = max(1, DOT_BLOCK_ROWS // group_size)
    xb, cb, sb, zb = _grouped(x, packed, scales, zeros, bits, group_size, gpb)
    step = lambda b, acc: acc + _dot_block(xb[b], cb[b], sb[b], zb[b], bits)  # noqa: E731
    return jax.lax.fori_loop(0, xb.shape[0], step, jnp.zeros((x.shape[0], n), jnp.float32))


def default_impl(bits: int, group_size: int) -> str:
    """xla on CPU (when groups align with bytes), dequant elsewhere."""
    if jax.default_backend() == "cpu" and group_size % (8 // bits) == 0:
        return "xla"
    return "dequant"


def group_matmul(x, packed, scales, zeros, bits: int, group_size: int,
                 impl: Optional[str] = None):
    """x [M, in] → [M, out] float32 through the quantised matrix (packed, scales, zeros)."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
    k = 8 // bits
    n_groups, n = scales.shape
    if packed.shape != (-(-x.shape[1] // k), n) or zeros.shape != scales.shape \
            or n_groups != -(-x.shape[1] // group_size):
        raise ValueError(f"group_matmul: x {x.shape}, codes {packed.shape}, scales "
                         f"{scales.shape}, zeros {zeros.shape} do not match bits={bits}, "
                         f"group_size={group_size}")
    if x.shape[0] == 0:
        return jnp.zeros((0, n), jnp.float32)
    impl = impl or default_impl(bits, group_size)
    if impl not in IMPLS:
        raise ValueError(f"unknown group_matmul impl {impl!r}; use one of {IMPLS}")
    if impl == "xla" and group_size % k:
        impl = "dequant"
    fn = {"xla": group_matmul_xla, "dequant": group_matmul_dequant,
          "reference": group_matmul_reference}[impl]
    return fn(x, packed, scales, zeros, bits, group_size)
