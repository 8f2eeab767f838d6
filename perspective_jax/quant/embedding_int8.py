"""The tied embedding/head in int8 with one float32 scale per vocabulary row (SPEC §3.4).

    codes, scale = quantize(E)        E [V, d] float → codes [V, d] int8, scale [V] float32
    E ≈ codes · scale[:, None]        scale_v = max_k |E_vk| / 127, codes = round(E / scale)

Export writes `embed/embedding` as the int8 codes and `embed/embedding.scale` beside
it (`quantize_in_place`). The engine holds them as an `Int8Table` whose rows are grouped in blocks of
at most `block_rows` (balanced; the last block zero-padded by fewer rows than there
are blocks) so the head never widens more than one block to float32:

    embed:  x[t]    = codes[tok_t] · scale[tok_t] · √d
    head:   logits  = concat_b (xn · codes_bᵀ) · scale_b        over row blocks b

which equals the float head on the dequantised table up to float32 rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

CODE_MAX = 127                      # int8 codes lie in [-127, 127] (symmetric)
BLOCK_ROWS = 2048                   # head row block: a float32 temporary of
                                    # BLOCK_ROWS·d·4 bytes (32 MiB at d 4096)
EMBED_KEY = "embed/embedding"       # the table's tensor in shared.safetensors
SCALE_KEY = EMBED_KEY + ".scale"    # its row scales (int8 exports)
FORMATS = ("float32", "int8")       # manifest "shared"/"embedding"


class Int8Table(NamedTuple):
    """codes [n_blocks, block_rows, d] int8, scale [n_blocks, block_rows] float32; the
    first `vocab` of the n_blocks·block_rows rows are the vocabulary (rest zero)."""
    codes: jax.Array
    scale: jax.Array


def quantize(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """table [V, d] float → (codes [V, d] int8, scale [V] float32), absmax per row; an
    all-zero row gets scale 0 and codes 0."""
    table = np.asarray(table, np.float32)
    if table.ndim != 2:
        raise ValueError(f"embedding table must be [V, d], got shape {table.shape}")
    scale = (np.abs(table).max(axis=1) / CODE_MAX).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)[:, None]
    codes = np.clip(np.rint(table / safe), -CODE_MAX, CODE_MAX).astype(np.int8)
    return codes, scale


def dequantize(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """codes [V, d] int8, scale [V] → float32 [V, d]."""
    return codes.astype(np.float32) * np.asarray(scale, np.float32)[:, None]


def quantize_in_place(tensors: dict) -> np.ndarray:
    """Replace the float table in the flat shared `tensors` by its int8 codes and row
    scales (EMBED_KEY, SCALE_KEY); returns the dequantised table the engine will use."""
    codes, scale = quantize(tensors[EMBED_KEY])
    tensors[EMBED_KEY], tensors[SCALE_KEY] = codes, scale
    return dequantize(codes, scale)


def check(codes: np.ndarray, scale: np.ndarray, vocab: int, d_model: int) -> str | None:
    """What is wrong with a stored int8 table for a (vocab, d_model) config, or None."""
    if codes.dtype != np.int8 or codes.shape != (vocab, d_model):
        return (f"embedding codes are {codes.dtype} {list(codes.shape)}, expected int8 "
                f"[{vocab}, {d_model}]")
    if scale.dtype != np.float32 or scale.shape != (vocab,):
        return f"embedding scales are {scale.dtype} {list(scale.shape)}, expected float32 [{vocab}]"
    if not np.all(np.isfinite(scale)) or np.any(scale < 0):
        return "embedding scales must be finite and >= 0"
    return None


def block_shape(vocab: int, block_rows: int) -> tuple[int, int]:
    """(n_blocks, rows per block): the fewest blocks of at most `block_rows` rows,
    balanced so the zero padding is less than one row per block."""
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    n_blocks = -(-vocab // block_rows)
    return n_blocks, -(-vocab // n_blocks)


def blocked(codes: np.ndarray, scale: np.ndarray, block_rows: int) -> Int8Table:
    """Host-side (numpy) `Int8Table` of [V, d] codes in `block_shape` blocks."""
    vocab, d = codes.shape
    n_blocks, rows = block_shape(vocab, block_rows)
    pad = n_blocks * rows - vocab
    codes = np.concatenate([codes, np.zeros((pad, d), np.int8)]) if pad else codes
    scale = np.concatenate([scale, np.zeros(pad, np.float32)]) if pad else scale
    return Int8Table(codes.reshape(n_blocks, rows, d), scale.reshape(n_blocks, rows))


def float_rows(table, vocab: int) -> np.ndarray:
    """The head the engine computes with as float32 [vocab, d] (host): a float table
    as it is, an `Int8Table` dequantised (codes · scale, padding rows dropped)."""
    if not isinstance(table, Int8Table):
        return np.asarray(table, np.float32)
    d = table.codes.shape[-1]
    codes = np.asarray(table.codes).reshape(-1, d)[:vocab]
    return dequantize(codes, np.asarray(table.scale).reshape(-1)[:vocab])


def embed_rows(table: Int8Table, tokens, dtype):
    """tokens [B, T] → dequantised rows [B, T, d] in `dtype`."""
    d = table.codes.shape[-1]
    codes, scale = table.codes.reshape(-1, d), table.scale.reshape(-1)
    return (codes[tokens].astype(jnp.float32) * scale[tokens][..., None]).astype(dtype)


def head_logits(table: Int8Table, xn, vocab: int):
    """xn [B, d] float32 → logits [B, vocab] float32, one row block at a time."""
    def block(args):
        codes, scale = args
        return jnp.dot(xn, codes.astype(jnp.float32).T) * scale        # [B, rows]
    per_block = jax.lax.map(block, (table.codes, table.scale))         # [n, B, rows]
    n, b, rows = per_block.shape
    return jnp.moveaxis(per_block, 0, 1).reshape(b, n * rows)[:, :vocab]
