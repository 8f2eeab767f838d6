"""Windowed grouped-query attention with RoPE (SPEC §3.2).

A query at position p attends to keys at positions p − W < s ≤ p (W = window).

* Training/prefill: blocked local attention. Queries are cut into blocks of
  size Bq = min(W, T); block j attends to itself and to the W keys before it
  (block j−1, or the ring cache for block 0). Cost O(T·(W + Bq)): linear in T.
* Decode: the same call with T = 1 against a ring-buffer KV cache of W slots
  (slot = position mod W). Memory is constant in context length.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from perspective_jax.config import ModelConfig
from perspective_jax.model.layers import OutProjection, Projection, dtype_of

_MASKED = -1e30  # finite, so fully-masked (padding) rows stay NaN-free


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, half-split layout. x: [B, T, H, D]; positions: [B, T]."""
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)        # [D/2]
    angle = positions.astype(jnp.float32)[..., None] * freq              # [B,T,D/2]
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class KVCache(NamedTuple):
    """Ring buffer of one GQA layer: k, v [B, W, K, D]; pos [B, W] (−1 = empty)."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array


def init_kv_cache(cfg: ModelConfig, batch: int) -> KVCache:
    shape = (batch, cfg.window, cfg.n_kv_heads, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype_of(cfg.dtype)),
                   v=jnp.zeros(shape, dtype_of(cfg.dtype)),
                   pos=jnp.full((batch, cfg.window), -1, jnp.int32))


def local_attention(q, k, v, q_pos, k_pos, prev_k, prev_v, prev_pos, window: int):
    """Blocked sliding-window GQA.

    q: [B, T, H, D]; k, v: [B, T, K, D]; q_pos, k_pos: [B, T];
    prev_k, prev_v: [B, W, K, D] and prev_pos [B, W] are the keys that precede
    this call (ring cache; positions −1 are empty). Returns [B, T, H, D].
    """
    b, t, h, dh = q.shape
    kv = k.shape[2]
    w = prev_k.shape[1]
    chex.assert_equal(w, window)
    bq = min(window, t)
    pad = (-t) % bq
    n = (t + pad) // bq
    if pad:
        big = jnp.iinfo(jnp.int32).max // 2  # padded keys lie in the future: masked
        q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
        q_pos = jnp.pad(q_pos, ((0, 0), (0, pad)), constant_values=-big)
        k_pos = jnp.pad(k_pos, ((0, 0), (0, pad)), constant_values=big)
    qb = q.reshape(b, n, bq, kv, h // kv, dh)
    kb, vb = (a.reshape(b, n, bq, kv, dh) for a in (k, v))
    qpb, kpb = q_pos.reshape(b, n, bq), k_pos.reshape(b, n, bq)
    # Keys preceding block j: the cache for j = 0, block j−1 otherwise (n > 1 ⇒ bq = W).
    def preceding(first, blocks):
        first = first[:, None].astype(blocks.dtype)
        return first if n == 1 else jnp.concatenate([first, blocks[:, :-1]], axis=1)

    prev_kb, prev_vb, prev_pb = (preceding(f, x) for f, x in
                                 ((prev_k, kb), (prev_v, vb), (prev_pos, kpb)))
    keys = jnp.concatenate([prev_kb, kb], axis=2)                # [B,n,W+bq,K,D]
    vals = jnp.concatenate([prev_vb, vb], axis=2)
    kpos = jnp.concatenate([prev_pb, kpb], axis=2)               # [B,n,W+bq]

    logits = jnp.einsum("bnqkgd,bnskd->bnkgqs", qb.astype(jnp.float32),
                        keys.astype(jnp.float32)) / jnp.sqrt(jnp.float32(dh))
    delta = qpb[:, :, :, None] - kpos[:, :, None, :]              # [B,n,q,s]
    valid = (kpos[:, :, None, :] >= 0) & (delta >= 0) & (delta < window)
    logits = jnp.where(valid[:, :, None, None], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bnkgqs,bnskd->bnqkgd", probs, vals.astype(jnp.float32))
    return out.reshape(b, n * bq, h, dh)[:, :t].astype(q.dtype)


def update_ring(cache: KVCache, k, v, positions) -> KVCache:
    """Write the newest min(T, W) keys/values at slots position mod W."""
    w = cache.pos.shape[1]
    if k.shape[1] > w:
        k, v, positions = k[:, -w:], v[:, -w:], positions[:, -w:]
    slots = positions % w

    def write(buf, new, idx):
        return buf.at[idx].set(new.astype(buf.dtype))

    return KVCache(k=jax.vmap(write)(cache.k, k, slots),
                   v=jax.vmap(write)(cache.v, v, slots),
                   pos=jax.vmap(write)(cache.pos, positions.astype(jnp.int32), slots))


class WindowedGQA(nn.Module):
    """x: [B, T, d] → ([B, T, d], cache). cache=None: training (empty past)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, segment_pos: jax.Array,
                 cache: Optional[KVCache] = None, adapters: Optional[dict] = None
                 ) -> tuple[jax.Array, Optional[KVCache]]:
        cfg = self.cfg
        b, t, _ = x.shape
        if adapters:
            raise ValueError("adapters are supported on PDR layers only")
        chex.assert_shape(segment_pos, (b, t))
        q = Projection((cfg.n_heads, cfg.head_dim), ("embed", "heads", "head_dim"), cfg,
                       name="w_q")(x)
        k = Projection((cfg.n_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"),
                       cfg, name="w_k")(x)
        v = Projection((cfg.n_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"),
                       cfg, name="w_v")(x)
        q = rope(q, segment_pos, cfg.rope_theta)
        k = rope(k, segment_pos, cfg.rope_theta)
        past = cache if cache is not None else init_kv_cache(cfg, b)
        out = local_attention(q, k, v, segment_pos, segment_pos, past.k, past.v, past.pos,
                              cfg.window)
        y = OutProjection(cfg.d_model, ("heads", "head_dim", "embed"), cfg, name="w_o")(
            out, n_in=2)
        new_cache = update_ring(cache, k, v, segment_pos) if cache is not None else None
        return y, new_cache
