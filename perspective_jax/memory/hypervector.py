"""Binary hypervectors packed 64 bits to a word (SPEC §3.7).

A hypervector of D bits (10,000 by default) is a uint64 array of W = ⌈D/64⌉ words,
bit j of the vector at bit j % 64 of word j // 64; the bits past D in the last word
are always 0. Every operation works on [..., W] arrays:

    bind(a, b)      = a ⊕ b                      (self-inverse: bind(bind(a, b), b) = a)
    hamming(a, b)   = popcount(a ⊕ b)            [...]  (bits that differ)
    similarity(a,b) = 1 − hamming / D            (1 identical, ≈ 0.5 unrelated)

`hamming_table(q [Q, W], x [N, W]) → [Q, N]` compares many queries with many
vectors: NumPy (`np.bitwise_count`) for a small table, a jitted JAX program
(uint32 halves, `lax.population_count`, on blocks of `JAX_BLOCK` queries, a smaller
one padded to a power of 2, so a few compiled programs serve every Q) from
`JAX_MIN_CELLS` cells up — the one rule that picks between them. The packed store holds 1,256 bytes (157 words) per 10,000-bit
vector, 7.96× less than a bool per element (the last word's 48 spare bits).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.errors import UserError

DIM = 10_000
WORD_BITS = 64
# Q × N × W word comparisons from which the batched JAX path is used (measured on 2
# CPU cores: below it NumPy's popcount is faster than a jitted call's overhead)
JAX_MIN_CELLS = 1 << 22
JAX_BLOCK = 256          # queries per call of the JAX program (fewer: padded to 2^k)


def words(dim: int) -> int:
    """Words of a `dim`-bit hypervector."""
    return -(-dim // WORD_BITS)


def check_dim(dim: int) -> int:
    if not isinstance(dim, (int, np.integer)) or dim < WORD_BITS:
        raise UserError(f"hypervector dimension {dim}: must be an integer >= {WORD_BITS}")
    return int(dim)


def pack(bits) -> np.ndarray:
    """bool/0-1 [..., D] → uint64 [..., ⌈D/64⌉] (bit j at word j//64, bit j%64)."""
    bits = np.asarray(bits).astype(bool)
    dim = bits.shape[-1]
    pad = words(dim) * WORD_BITS - dim
    if pad:
        bits = np.concatenate([bits, np.zeros((*bits.shape[:-1], pad), bool)], -1)
    by = np.packbits(bits, axis=-1, bitorder="little")              # [..., W*8] uint8
    return np.ascontiguousarray(by).view("<u8").astype(np.uint64, copy=False)


def unpack(hv: np.ndarray, dim: int) -> np.ndarray:
    """uint64 [..., W] → bool [..., dim] (inverse of `pack`)."""
    hv = np.ascontiguousarray(np.asarray(hv, np.uint64).astype("<u8", copy=False))
    by = hv.view(np.uint8)
    return np.unpackbits(by, axis=-1, count=dim, bitorder="little").astype(bool)


def random(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    """n uniformly random hypervectors [n, W] (bits past `dim` zero)."""
    w = words(dim)
    hv = rng.integers(0, 2**64, size=(n, w), dtype=np.uint64, endpoint=False)
    return hv & tail_mask(dim)


@functools.lru_cache(maxsize=16)
def _tail_mask(dim: int) -> bytes:
    mask = np.full(words(dim), np.uint64(2**64 - 1), np.uint64)
    rest = dim % WORD_BITS
    if rest:
        mask[-1] = np.uint64((1 << rest) - 1)
    return mask.tobytes()


def tail_mask(dim: int) -> np.ndarray:
    """[W] words with the `dim` valid bits set."""
    return np.frombuffer(_tail_mask(dim), np.uint64)


def bind(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a ⊕ b (binding and unbinding are the same operation)."""
    return np.bitwise_xor(a, b)


def _count_dtype(n_words: int):
    """The narrowest sum that holds n_words·64 set bits (uint16 sums are faster)."""
    return np.uint16 if n_words * WORD_BITS < 2**16 else np.int64


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Differing bits of a and b over the last axis (broadcast), int64."""
    x = np.bitwise_xor(a, b)
    return np.bitwise_count(x).sum(axis=-1, dtype=_count_dtype(x.shape[-1])).astype(np.int64)


def similarity(a: np.ndarray, b: np.ndarray, dim: int = DIM) -> np.ndarray:
    """1 − hamming / dim."""
    return 1.0 - hamming(a, b) / dim


def flip(hv: np.ndarray, fraction: float, rng: np.random.Generator, dim: int = DIM):
    """hv [..., W] with round(fraction·dim) distinct bits flipped per vector (a fuzzy key)."""
    bits = unpack(hv, dim)
    flat = bits.reshape(-1, dim)
    k = int(round(fraction * dim))
    for row in flat:
        row[rng.choice(dim, size=k, replace=False)] ^= True
    return pack(flat.reshape(bits.shape))


def _as_u32(hv: np.ndarray) -> np.ndarray:
    """uint64 [..., W] → uint32 [..., 2W] (the same bits; JAX runs without x64)."""
    return np.ascontiguousarray(np.asarray(hv, np.uint64)).view(np.uint32)


@jax.jit
def _hamming_table_jax(q, x):
    """q [Q, 2W], x [N, 2W] uint32 → [Q, N] int32 differing bits."""
    def one(row):
        return jnp.sum(jax.lax.population_count(jnp.bitwise_xor(row[None], x)), axis=-1,
                       dtype=jnp.int32)
    return jax.lax.map(one, q)


def hamming_table(q: np.ndarray, x: np.ndarray, use_jax=None, xt=None) -> np.ndarray:
    """Differing bits of every query q [Q, W] with every vector x [N, W] → [Q, N].
    `use_jax` None: the JAX path from JAX_MIN_CELLS word comparisons up. `xt`: x
    word-major [W, N] where the caller keeps it (NumPy's path for W ≤ 32 uses it)."""
    q, x = np.atleast_2d(q), np.atleast_2d(x)
    if q.shape[-1] != x.shape[-1]:
        raise UserError(f"hypervectors of {q.shape[-1]} and {x.shape[-1]} words cannot "
                        "be compared")
    if use_jax is None:
        use_jax = q.shape[0] * x.shape[0] * q.shape[-1] >= JAX_MIN_CELLS
    n_q, (n_x, w) = q.shape[0], x.shape
    out = np.empty((n_q, n_x), np.int64)
    if use_jax:
        q32, x32 = _as_u32(q), _as_u32(x)
        for i in range(0, n_q, JAX_BLOCK):
            block = q32[i:i + JAX_BLOCK]
            rows = len(block)
            size = min(JAX_BLOCK, 1 << (rows - 1).bit_length())   # pad to a power of 2:
            if size > rows:                                       # few programs for all Q
                block = np.concatenate([block, np.zeros((size - rows, block.shape[1]),
                                                        np.uint32)])
            out[i:i + rows] = np.asarray(_hamming_table_jax(block, x32))[:rows]
        return out
    step = max(1, (1 << 20) // max(1, n_x * w))                    # bound the temporary
    if w <= 32:
        # few words (a prefix of the vectors): x word-major [W, N], so the sum over
        # words adds whole rows instead of reducing many short ones
        xt = np.ascontiguousarray(x.T) if xt is None else xt
        dt = _count_dtype(w)
        for i in range(0, n_q, step):
            out[i:i + step] = np.bitwise_count(
                np.bitwise_xor(q[i:i + step, :, None], xt[None])).sum(axis=1, dtype=dt)
        return out
    for i in range(0, n_q, step):
        out[i:i + step] = hamming(q[i:i + step, None, :], x[None, :, :])
    return out
