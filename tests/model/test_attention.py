"""Windowed GQA against a naive full masked attention in float64."""

import jax.numpy as jnp
import numpy as np
import pytest

from perspective_jax.model.attention import (KVCache, init_kv_cache, local_attention, rope,
                                             update_ring)


def naive_window_attention(q, k, v, window):
    """Full T×T attention with mask 0 ≤ t − s < window, GQA by head repetition."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    k = np.repeat(k, h // kv, axis=2)
    v = np.repeat(v, h // kv, axis=2)
    logits = np.einsum("bqhd,bshd->bhqs", q, k) / np.sqrt(d)
    delta = np.arange(t)[:, None] - np.arange(t)[None, :]
    mask = (delta >= 0) & (delta < window)
    logits = np.where(mask, logits, -np.inf)
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqs,bshd->bqhd", p, v)


def empty_past(b, window, kv, d):
    return (jnp.zeros((b, window, kv, d)), jnp.zeros((b, window, kv, d)),
            jnp.full((b, window), -1, jnp.int32))


@pytest.mark.parametrize("t,window", [(40, 8), (37, 8), (5, 8), (64, 64), (50, 1)])
def test_blocked_window_attention_matches_naive(t, window):
    rng = np.random.default_rng(t + window)
    b, h, kv, d = 2, 4, 2, 8
    q, k, v = (rng.normal(size=(b, t, n, d)) for n in (h, kv, kv))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    out = local_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), pos, pos,
                          *empty_past(b, window, kv, d), window)
    ref = naive_window_attention(q, k, v, window)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_ring_cache_continuation_matches_one_pass():
    """Prefill 13 tokens into the ring, then 20 one-token steps == one pass of 33."""
    rng = np.random.default_rng(0)
    b, t, h, kv, d, window = 1, 33, 4, 2, 8, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) for n in (h, kv, kv))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    full = local_attention(q, k, v, pos, pos, *empty_past(b, window, kv, d), window)
    cache = KVCache(k=jnp.zeros((b, window, kv, d)), v=jnp.zeros((b, window, kv, d)),
                    pos=jnp.full((b, window), -1, jnp.int32))
    outs = []
    for lo, hi in [(0, 13)] + [(i, i + 1) for i in range(13, t)]:
        sl = slice(lo, hi)
        outs.append(local_attention(q[:, sl], k[:, sl], v[:, sl], pos[:, sl], pos[:, sl],
                                    cache.k, cache.v, cache.pos, window))
        cache = update_ring(cache, k[:, sl], v[:, sl], pos[:, sl])
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full),
                               atol=1e-5)
    # the ring holds exactly the last `window` positions
    assert sorted(np.asarray(cache.pos[0]).tolist()) == list(range(t - window, t))


def test_rope_preserves_norm_and_relative_phase():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(1, 6, 2, 8)), jnp.float32)
    pos = jnp.arange(6)[None]
    y = rope(x, pos, 10000.0)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(y), axis=-1),
                               np.linalg.norm(np.asarray(x), axis=-1), rtol=1e-5)
    # q·k after RoPE depends only on the position difference
    q, k = x[:, :1], x[:, 1:2]
    dots = [float(jnp.sum(rope(q, jnp.array([[a]]), 1e4) * rope(k, jnp.array([[a + 3]]), 1e4)))
            for a in (0, 5, 11)]
    np.testing.assert_allclose(dots, dots[0], rtol=1e-4)


def test_kv_cache_layout(small_cfg):
    c = init_kv_cache(small_cfg, 3)
    assert c.k.shape == (3, small_cfg.window, small_cfg.n_kv_heads, small_cfg.head_dim)
    assert (np.asarray(c.pos) == -1).all()
