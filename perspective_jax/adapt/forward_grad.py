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

Guided directions (`guided_directions`): r orthonormal guide vectors U (e.g. the
recent estimates: the gradient of a run changes slowly) get their exact projections,
the other K − r directions are Gaussian with U's span projected out, v = P w,
P = I − U Uᵀ:

    ĝ = U Uᵀ ∇L + (1/(K − r)) Σ_k (∇L · v_k) v_k        E[ĝ] = U Uᵀ∇L + P∇L = ∇L

still unbiased for any guides, and exact in their span: when the gradient lies
mostly there, the variance falls from ≈ dim/K·‖∇L‖² to ≈ dim/(K − r)·‖P∇L‖².
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


def guided_directions(key: jax.Array, k: int, guides: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
    """(directions [K, dim], weights [K]) with ĝ = Σ_k weight_k (∇L · v_k) v_k: the
    first r = len(guides) rows span the guides (orthonormalised; weight 1), the rest
    are Gaussian directions orthogonal to them (weight 1/(K − r)); module docstring.
    Zero or parallel guides are dropped from the span (their rows are zero)."""
    r, dim = guides.shape
    if not 0 <= r < k:
        raise UserError(f"guided forward gradients: {r} guides need more than {r} "
                        f"directions (got {k})")
    w = jax.random.normal(key, (k - r, dim), jnp.float32)
    if r == 0:
        return w, jnp.ones((k,), jnp.float32) / k
    q, rr = jnp.linalg.qr(guides.astype(jnp.float32).T)              # [dim, r]
    keep = jnp.abs(jnp.diagonal(rr)) > 1e-6 * jnp.maximum(jnp.max(jnp.abs(rr)), 1e-30)
    q = q * keep[None, :]
    w = w - (w @ q) @ q.T
    weights = jnp.concatenate([jnp.ones((r,), jnp.float32),
                               jnp.full((k - r,), 1.0 / (k - r), jnp.float32)])
    return jnp.concatenate([q.T, w]), weights


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
