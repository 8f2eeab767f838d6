"""Forward gradients: a gradient estimate from directional derivatives alone, no
backward pass and no stored activations (SPEC §3.8).

    g_hat, loss = forward_gradient(loss_fn, params, key, k=8)

For K directions v_k ~ N(0, I) over all of `params` (a pytree):

    d_k   = ∇L · v_k                      (one `jax.jvp` each; `jax.vmap`-batched)
    ĝ     = (1/K) Σ_k d_k v_k             E[ĝ] = ∇L, since E[v vᵀ] = I

`orthogonal=True` makes the K directions orthogonal (QR of a Gaussian draw), each
of norm √dim, so E[v vᵀ] = I still holds and the estimate's variance falls from
≈ (dim + 1)/K·‖∇L‖² to ≈ (dim − K)/K·‖∇L‖² (exact at K = dim). `antithetic=True`
draws K/2 directions and uses ±v: with an exact jvp the pair's two terms are equal
(d(−v)·(−v) = d(v)·v), so it has the variance of K/2 directions — kept to measure
(tests/adapt/test_forward_grad.py), not as a default.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from perspective_jax.errors import UserError


def directions(key: jax.Array, k: int, dim: int, orthogonal: bool = False,
               antithetic: bool = False) -> jax.Array:
    """K tangent directions [K, dim] float32 (module docstring)."""
    if k < 1 or (antithetic and k % 2):
        raise UserError(f"forward-gradient directions k={k}: must be >= 1 (and even "
                        "with antithetic pairs)")
    n = k // 2 if antithetic else k
    v = jax.random.normal(key, (n, dim), jnp.float32)
    if orthogonal:
        if n > dim:
            raise UserError(f"{n} orthogonal directions in {dim} dimensions")
        q, _ = jnp.linalg.qr(v.T)                       # [dim, n], orthonormal columns
        v = q.T * jnp.sqrt(jnp.float32(dim))
    return jnp.concatenate([v, -v]) if antithetic else v


def forward_gradient(loss_fn: Callable, params, key: jax.Array, k: int = 8,
                     orthogonal: bool = False, antithetic: bool = False):
    """(ĝ with the structure of `params`, L(params)): the K-direction forward
    gradient of `loss_fn(params) → scalar` (module docstring)."""
    flat, unravel = ravel_pytree(params)
    v = directions(key, k, flat.size, orthogonal, antithetic)

    def along(t):
        loss, d = jax.jvp(lambda x: loss_fn(unravel(x)), (flat,), (t.astype(flat.dtype),))
        return loss, d
    losses, d = jax.vmap(along)(v)
    g = jnp.mean(d[:, None] * v, axis=0)
    return unravel(g.astype(flat.dtype)), losses[0]
