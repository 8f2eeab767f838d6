"""Perspective Decay Recurrence in XLA (SPEC §3.1): reference and chunked forms.

The recurrence, per batch element, with per-row decay γ_t = exp(λ_t):

    S_t = diag(γ_t) S_{t-1} + v_t k_tᵀ        S ∈ R^{d×r}
    y_t = S_t q_t                              (the layer applies W_o after)

Shapes: log_decay λ and v are [B, T, d]; k and q are [B, T, r]; the state
S is [B, d, r]. Every function returns (y [B, T, d], S_T [B, d, r]).

The XLA forms (the Pallas kernel is `kernels_pallas.pdr_chunked`; the one
dispatch with its `auto` rule is `kernels_pallas.pdr_scan`):
  * `pdr_chunked`     — chunkwise-parallel, c×c×d pairwise decays (default off GPU).
  * `pdr_chunked_matmul` — chunkwise with the intra-chunk term as matmuls, stable
                        (every exponential factor ≤ 1 outside m×m diagonal blocks).
  * `pdr_sequential`  — `lax.scan` over tokens: the definition and test reference.
  * `pdr_associative` — `lax.associative_scan`; materialises a state per token.
  * `pdr_step`        — the O(1) decode form.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

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


def _chunk_step(state, chunk_inputs):
    """Advance one chunk. state: [B, d, r]; chunk inputs λ, v: [B, c, d]; k, q: [B, c, r].

    With within-chunk cumulative log-decays L_t = Σ_{u≤t} λ_u (every
    exponential below has a non-positive argument, so no factor exceeds 1):

      intra  y_t += Σ_{s≤t} (q_t·k_s) exp(L_t − L_s) ⊙ v_s     (pairwise c×c×d)
      inter  y_t += exp(L_t) ⊙ (S_in q_t)
      state  S_out = exp(L_c) ⊙ S_in + Σ_s (exp(L_c − L_s) ⊙ v_s) k_sᵀ
    """
    lam, k, q, v = chunk_inputs
    c = lam.shape[1]
    cum = jnp.cumsum(lam, axis=1)                                  # [B,c,d] ≤ 0
    last = cum[:, -1]                                              # [B,d]
    causal = jnp.tril(jnp.ones((c, c), dtype=bool))[:, :, None]
    diff = cum[:, :, None, :] - cum[:, None, :, :]                 # [B,t,s,d]
    pair_decay = jnp.exp(jnp.where(causal, diff, -jnp.inf))
    scores = jnp.einsum("btr,bsr->bts", q, k)
    y = jnp.einsum("bts,btsd,bsd->btd", scores, pair_decay, v)
    y = y + jnp.exp(cum) * jnp.einsum("bdr,btr->btd", state, q)
    to_end = jnp.exp(last[:, None, :] - cum) * v
    state = jnp.exp(last)[:, :, None] * state + jnp.einsum("bsd,bsr->bdr", to_end, k)
    return state, y


def _chunk_step_matmul(state, chunk_inputs, sub: int):
    """`_chunk_step` with the intra-chunk sum as matmuls, stable for any decay.

    The chunk's c tokens form J = c/m sub-blocks of m. For a query t in sub-block I
    (first token I₀, reference R_I = L_{I₀−1}, R_0 = 0) and a key s < I₀:

      exp(L_t − L_s) = exp(L_t − R_I) · exp(R_I − L_s),   both factors ≤ 1,

    so  y_t += exp(L_t − R_I) ⊙ Σ_{s<I₀} (q_t·k_s) (exp(R_I − L_s) ⊙ v_s)  is one
    [m, c] × [c, d] matmul per sub-block. Keys in t's own sub-block use the exact
    pairwise m×m×d form. No factor exceeds 1, so nothing overflows, and a factor
    that underflows multiplies a product that is smaller still.
    """
    lam, k, q, v = chunk_inputs
    b, c, d = lam.shape
    m = sub
    j = c // m
    cum = jnp.cumsum(lam, axis=1)                                  # [B,c,d] ≤ 0
    last = cum[:, -1]
    scores = jnp.einsum("btr,bsr->bts", q, k)                      # [B,c,c]
    ref = jnp.concatenate([jnp.zeros_like(cum[:, :1]), cum[:, m - 1:c - 1:m]], axis=1)
    before = jnp.arange(c)[None, :] < (jnp.arange(j) * m)[:, None]  # [J,c]: s < I₀
    arg = jnp.where(before[None, :, :, None], ref[:, :, None, :] - cum[:, None, :, :],
                    -jnp.inf)
    keys = jnp.exp(arg) * v[:, None]                               # [B,J,c,d]
    cum_blocks = cum.reshape(b, j, m, d)
    y = jnp.exp(cum_blocks - ref[:, :, None, :]) * jnp.einsum(
        "bjis,bjsd->bjid", scores.reshape(b, j, m, c), keys)        # [B,J,m,d]
    tri = jnp.tril(jnp.ones((m, m), dtype=bool))[None, None, :, :, None]
    diff = cum_blocks[:, :, :, None, :] - cum_blocks[:, :, None, :, :]
    pair_decay = jnp.exp(jnp.where(tri, diff, -jnp.inf))           # [B,J,m,m,d]
    diag = jnp.diagonal(scores.reshape(b, j, m, j, m), axis1=1, axis2=3)  # [B,m,m,J]
    diag = jnp.moveaxis(diag, -1, 1)                               # [B,J,m,m]
    y = y + jnp.einsum("bjts,bjtsd,bjsd->bjtd", diag, pair_decay, v.reshape(b, j, m, d))
    y = y.reshape(b, c, d) + jnp.exp(cum) * jnp.einsum("bdr,btr->btd", state, q)
    to_end = jnp.exp(last[:, None, :] - cum) * v
    state = jnp.exp(last)[:, :, None] * state + jnp.einsum("bsd,bsr->bdr", to_end, k)
    return state, y


def pdr_chunked_matmul(log_decay, k, q, v, state, chunk: int = 32, sub: int = 4):
    """Chunkwise PDR with matmul-shaped intra-chunk work (`_chunk_step_matmul`),
    stable for any decay; `sub` (the diagonal block) must divide `chunk`."""
    if chunk % sub:
        raise ValueError(f"PDR sub-block {sub} does not divide the chunk {chunk}")
    return pdr_chunked(log_decay, k, q, v, state, chunk=chunk,
                       step_fn=functools.partial(_chunk_step_matmul, sub=sub))


def pdr_chunked(log_decay, k, q, v, state, chunk: int = 16, step_fn=_chunk_step):
    """Chunkwise PDR, stable for any decay in (0, 1): `lax.scan` over chunks of
    `chunk` tokens, each advanced by `step_fn` (`_chunk_step`: parallel within the
    chunk).

    The step is rematerialised (`jax.checkpoint`), so reverse mode keeps only
    the d×r state entering each chunk — never one per token — plus the inputs;
    the c×c×d pairwise decays are recomputed one chunk at a time.
    """
    _check(log_decay, k, q, v, state)
    b, t, d = v.shape
    r = k.shape[-1]
    pad = (-t) % chunk
    if pad:  # decay 1 and zero updates: padding leaves the state untouched
        widths = ((0, 0), (0, pad), (0, 0))
        log_decay, k, q, v = (jnp.pad(a, widths) for a in (log_decay, k, q, v))
    n = (t + pad) // chunk

    def chunk_major(a, width):                                     # [n, B, c, width]
        return jnp.swapaxes(a.reshape(b, n, chunk, width), 0, 1)

    xs = (chunk_major(log_decay.astype(jnp.float32), d), chunk_major(k, r),
          chunk_major(q, r), chunk_major(v, d))
    step = jax.checkpoint(step_fn, prevent_cse=False)
    final, ys = jax.lax.scan(step, state, xs)
    y = jnp.swapaxes(ys, 0, 1).reshape(b, n * chunk, d)[:, :t]
    return y, final
