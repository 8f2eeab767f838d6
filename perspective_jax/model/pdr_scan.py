"""Perspective Decay Recurrence scans (SPEC §3.1), independent of Flax.

The recurrence, per batch element, with per-row decay γ_t = exp(λ_t):

    S_t = diag(γ_t) S_{t-1} + v_t k_tᵀ        S ∈ R^{d×r}
    y_t = S_t q_t                              (the layer applies W_o after)

Shapes: log_decay λ and v are [B, T, d]; k and q are [B, T, r]; the state
S is [B, d, r]. Every function returns (y [B, T, d], S_T [B, d, r]).

Three implementations behind `pdr_scan(..., impl=)`:
  * ``chunked``  (default) — chunkwise-parallel; see `pdr_chunked`.
  * ``scan``     — `lax.scan` over tokens (the sequential definition).
  * ``associative`` — `lax.associative_scan`; materialises a state per token.
`pdr_step` is the O(1) decode form.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

IMPLS = ("chunked", "scan", "associative")


def _check(log_decay, k, q, v, state):
    b, t, d = v.shape
    r = k.shape[-1]
    chex.assert_shape(log_decay, (b, t, d))
    chex.assert_shape([k, q], (b, t, r))
    chex.assert_shape(state, (b, d, r))


def pdr_step(log_decay, k, q, v, state):
    """One decode step. log_decay, v: [B, d]; k, q: [B, r]; state: [B, d, r]."""
    state = jnp.exp(log_decay)[:, :, None] * state + v[:, :, None] * k[:, None, :]
    return jnp.einsum("bdr,br->bd", state, q), state


def pdr_sequential(log_decay, k, q, v, state):
    """`lax.scan` over time: the definition, O(T) sequential steps."""
    _check(log_decay, k, q, v, state)

    def body(s, xs):
        y, s = pdr_step(*xs, s)
        return s, y

    xs = tuple(jnp.swapaxes(a, 0, 1) for a in (log_decay, k, q, v))
    state, ys = jax.lax.scan(body, state, xs)
    return jnp.swapaxes(ys, 0, 1), state


def pdr_associative(log_decay, k, q, v, state):
    """`lax.associative_scan` over (decay, outer-product) pairs.

    Memory is O(B·T·d·r): a full state per token. Kept as a benchmark baseline.
    """
    _check(log_decay, k, q, v, state)
    decay = jnp.exp(log_decay)                                   # [B,T,d]
    update = v[..., :, None] * k[..., None, :]                   # [B,T,d,r]
    update = update.at[:, 0].add(decay[:, 0, :, None] * state)

    def combine(left, right):
        a1, u1 = left
        a2, u2 = right
        return a1 * a2, a2[..., None] * u1 + u2

    _, states = jax.lax.associative_scan(combine, (decay, update), axis=1)
    y = jnp.einsum("btdr,btr->btd", states, q)
    return y, states[:, -1]


@functools.partial(jax.checkpoint, prevent_cse=False)
def _intra_chunk(cum, k, q, v):
    """y_t = Σ_{s≤t in chunk} (q_t·k_s) · exp(L_t − L_s) ⊙ v_s.

    cum, v: [B, n, c, d]; k, q: [B, n, c, r]. The pairwise decay tensor
    [B, n, c, c, d] has every entry ≤ 1 (t ≥ s) and is recomputed in the
    backward pass instead of stored (jax.checkpoint).
    """
    c = cum.shape[2]
    causal = jnp.tril(jnp.ones((c, c), dtype=bool))[:, :, None]
    diff = cum[:, :, :, None, :] - cum[:, :, None, :, :]          # [B,n,t,s,d]
    pair_decay = jnp.exp(jnp.where(causal, diff, -jnp.inf))
    scores = jnp.einsum("bntr,bnsr->bnts", q, k)
    return jnp.einsum("bnts,bntsd,bnsd->bntd", scores, pair_decay, v)


def pdr_chunked(log_decay, k, q, v, state, chunk: int = 16):
    """Chunkwise-parallel PDR, stable for any decay in (0, 1).

    T is cut into chunks of `chunk` steps with within-chunk cumulative
    log-decays L (L_t = Σ_{u≤t} λ_u, restarting at each chunk). Every
    exponential evaluated has a non-positive argument, so no factor exceeds 1:

      intra   y_t += Σ_{s≤t} (q_t·k_s) exp(L_t − L_s) v_s       (pairwise, c×c)
      inter   y_t += exp(L_t) ⊙ (S_in q_t)                      (state entering)
      passing S_out = exp(L_c) ⊙ S_in + Σ_s (exp(L_c − L_s) ⊙ v_s) k_sᵀ

    Only one d×r state per chunk is materialised, never one per token.
    """
    _check(log_decay, k, q, v, state)
    b, t, d = v.shape
    r = k.shape[-1]
    pad = (-t) % chunk
    if pad:  # decay 1 and zero updates: padding leaves the state untouched
        widths = ((0, 0), (0, pad), (0, 0))
        log_decay, k, q, v = (jnp.pad(a, widths) for a in (log_decay, k, q, v))
    n = (t + pad) // chunk
    log_decay = log_decay.astype(jnp.float32)
    lam, v = (a.reshape(b, n, chunk, d) for a in (log_decay, v))
    k, q = (a.reshape(b, n, chunk, r) for a in (k, q))

    cum = jnp.cumsum(lam, axis=2)                                  # [B,n,c,d] ≤ 0
    last = cum[:, :, -1]                                           # [B,n,d]
    y_intra = _intra_chunk(cum, k, q, v)

    to_end = jnp.exp(last[:, :, None, :] - cum) * v                # factors ≤ 1
    chunk_update = jnp.einsum("bnsd,bnsr->bndr", to_end, k)        # [B,n,d,r]
    chunk_decay = jnp.exp(last)                                    # [B,n,d]

    def pass_state(s, xs):
        a, u = xs
        return a[:, :, None] * s + u, s                            # emit S_in

    final, s_in = jax.lax.scan(
        pass_state, state,
        (jnp.swapaxes(chunk_decay, 0, 1), jnp.swapaxes(chunk_update, 0, 1)))
    s_in = jnp.swapaxes(s_in, 0, 1)                                # [B,n,d,r]
    y_inter = jnp.exp(cum) * jnp.einsum("bndr,bntr->bntd", s_in, q)
    y = (y_intra + y_inter).reshape(b, n * chunk, d)[:, :t]
    return y, final


def pdr_scan(log_decay, k, q, v, state, *, impl: str = "chunked", chunk: int = 16):
    """Dispatch to one PDR implementation; all return (y, final_state)."""
    if impl == "chunked":
        return pdr_chunked(log_decay, k, q, v, state, chunk=chunk)
    if impl == "scan":
        return pdr_sequential(log_decay, k, q, v, state)
    if impl == "associative":
        return pdr_associative(log_decay, k, q, v, state)
    raise ValueError(f"unknown PDR implementation {impl!r}; use one of {IMPLS}")
