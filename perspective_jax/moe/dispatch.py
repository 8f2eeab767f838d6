"""Dropless top-1 expert dispatch: every token reaches its expert (SPEC §3.3).

    y = expert_swiglu(x, expert_index, w_gate, w_up, w_down, impl="auto")

x: [N, d]; expert_index: [N] int; w_gate, w_up: [E, d, f]; w_down: [E, f, d].
Result [N, d] with y_n = SwiGLU_{e_n}(x_n). Implementations (identical values):

* ``ragged``  — sort tokens by expert, `jax.lax.ragged_dot` per matmul, unsort.
                Chosen on GPU/TPU.
* ``blocked`` — sort by expert and pad each expert's group to a multiple of a
                block of b tokens (static bound N + E·(b−1) rows), so every block
                belongs to one expert; one batched einsum over blocks with that
                expert's weights. Dropless, static shapes; chosen on CPU, where
                `ragged_dot` is ~10× slower.
* ``dense``   — every expert on every token, then select: the reference.

``hidden_fn`` (default identity) is applied to the hidden activation
silu(x·W_gate) ⊙ (x·W_up) before W_down — the hook for 8-bit activation
quantisation of ternary experts (it must act per token, along the last axis).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from perspective_jax.config.choices import DISPATCH_IMPLS

IMPLS = tuple(i for i in DISPATCH_IMPLS if i != "auto")   # the concrete ones


def default_impl() -> str:
    return "blocked" if jax.default_backend() == "cpu" else "ragged"


def _identity(h):
    return h


def _swiglu(x, w_gate, w_up, w_down, hidden_fn=_identity):
    return jnp.dot(hidden_fn(jax.nn.silu(jnp.dot(x, w_gate)) * jnp.dot(x, w_up)), w_down)


def dispatch_dense(x, idx, w_gate, w_up, w_down, hidden_fn=_identity):
    """Reference: all experts on all tokens ([E, N, d]), then pick each token's."""
    every = jax.vmap(lambda g, u, d: _swiglu(x, g, u, d, hidden_fn))(w_gate, w_up, w_down)
    return jnp.take_along_axis(every, idx[None, :, None], axis=0)[0]


def _sort(idx, n_experts):
    order = jnp.argsort(idx, stable=True)
    group_sizes = jnp.bincount(idx, length=n_experts).astype(jnp.int32)
    return order, group_sizes


def dispatch_ragged(x, idx, w_gate, w_up, w_down, hidden_fn=_identity):
    order, sizes = _sort(idx, w_gate.shape[0])
    xs = x[order]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w_gate, sizes)) * jax.lax.ragged_dot(xs, w_up, sizes)
    ys = jax.lax.ragged_dot(hidden_fn(h), w_down, sizes)
    return jnp.zeros_like(ys).at[order].set(ys)


def dispatch_blocked(x, idx, w_gate, w_up, w_down, block: int = 64, hidden_fn=_identity):
    n, d = x.shape
    e = w_gate.shape[0]
    b = max(1, min(block, n))
    n_blocks = -(-(n + e * (b - 1)) // b)           # static upper bound on blocks
    order, sizes = _sort(idx, e)
    padded = -(-sizes // b) * b                      # each group rounded up to blocks
    group_start = jnp.cumsum(padded) - padded        # first padded row of each group
    sorted_idx = idx[order]
    rank = jnp.arange(n) - (jnp.cumsum(sizes) - sizes)[sorted_idx]
    row = group_start[sorted_idx] + rank             # padded row of each sorted token
    xp = jnp.zeros((n_blocks * b, d), x.dtype).at[row].set(x[order])
    # expert owning each block (blocks past the last group reuse expert 0: all zeros)
    block_start = jnp.arange(n_blocks) * b
    block_expert = jnp.clip(jnp.searchsorted(jnp.cumsum(padded), block_start, side="right"),
                            0, e - 1)
    xb = xp.reshape(n_blocks, b, d)
    g = jnp.einsum("nbd,ndf->nbf", xb, w_gate[block_expert])
    u = jnp.einsum("nbd,ndf->nbf", xb, w_up[block_expert])
    yb = jnp.einsum("nbf,nfd->nbd", hidden_fn(jax.nn.silu(g) * u), w_down[block_expert])
    ys = yb.reshape(n_blocks * b, d)[row]
    return jnp.zeros((n, d), ys.dtype).at[order].set(ys)


def expert_swiglu(x, idx, w_gate, w_up, w_down, impl: str = "auto", block: int = 64,
                  hidden_fn=_identity):
    """Dispatch each token to its expert's SwiGLU FFN; see module docstring."""
    n, d = x.shape
    e, _, f = w_gate.shape
    chex.assert_shape(idx, (n,))
    chex.assert_shape([w_gate, w_up], (e, d, f))
    chex.assert_shape(w_down, (e, f, d))
    impl = default_impl() if impl == "auto" else impl
    if impl == "ragged":
        return dispatch_ragged(x, idx, w_gate, w_up, w_down, hidden_fn)
    if impl == "blocked":
        return dispatch_blocked(x, idx, w_gate, w_up, w_down, block, hidden_fn)
    if impl == "dense":
        return dispatch_dense(x, idx, w_gate, w_up, w_down, hidden_fn)
    raise ValueError(f"unknown dispatch {impl!r}; use one of {IMPLS} or 'auto'")
