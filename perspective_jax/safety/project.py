"""Euclidean projection onto a polytope {y : a_j·y ≤ b_j, j = 1..m} (unit rows a_j).

    y, info = project(x, normals, bounds, gram, interior)      # x [N, d]; the fast path
    y = dykstra(x, normals, bounds, sweeps=2000)               # the reference

`dykstra`: cyclic Dykstra over every half-space (for half-spaces it is Hildreth's
dual coordinate ascent); converges to the projection; slow but simple.

`project`: a primal–dual active-set method on the dual problem
    min_{λ ≥ 0} ½ λᵀGλ − λᵀr₀,   G = AAᵀ,  r₀ = Ax − b,  y = x − Aᵀλ,
over a working set S of at most `working_set` rows: solve G_SS λ_S = r₀_S, then keep
the rows with λ_j > 0 and add the rows still violated (r_j = r₀_j − (Gλ)_j > 0); stop
when S repeats (then y is the exact projection: it satisfies every half-space and
the KKT conditions hold on S). Bounded by `max_iters`; whatever residual violation
is left then is reported and removed by moving y toward `interior` (a point strictly
inside) just far enough: y' = c + θ(y − c), θ = min_j (b_j − a_j·c)/(a_j·y − a_j·c)
over violated rows. So every output is inside (a_j·y' ≤ b_j + tol) by construction,
even when the active-set step did not converge; it is then not the nearest point.
A step stopped by `max_iters` can also end inside without the pull and still not be
the nearest point (its last working set was not optimal): `info["converged"]` is True
only when the working set repeated and nothing was left violated (y is the projection),
or when x was already inside.

A point with a_j·x ≤ b_j + tol for every j is returned unchanged (bit for bit), so
projecting twice changes nothing. The projection is not differentiable with zero
gradient in general: on a face its Jacobian is the projector onto that face.
Rows whose bound is `INACTIVE` or more never bind (an inactive flagged-token row).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

INACTIVE = 1e30       # a bound that no state reaches: the row is switched off
_RIDGE = 1e-6         # added to G_SS's diagonal: duplicate or dependent rows stay solvable


def dykstra(x: jax.Array, normals: jax.Array, bounds: jax.Array, sweeps: int = 1000):
    """Reference projection of x [d] (or [N, d]) by `sweeps` cyclic Dykstra sweeps."""
    if x.ndim == 2:
        return jax.vmap(lambda v: dykstra(v, normals, bounds, sweeps))(x)
    normals, bounds = jnp.asarray(normals, x.dtype), jnp.asarray(bounds, x.dtype)
    m = normals.shape[0]

    def row(j, carry):
        y, incr = carry
        z = y + incr[j] * normals[j]
        over = jnp.maximum(jnp.dot(normals[j], z) - bounds[j], 0)
        return z - over * normals[j], incr.at[j].set(over)

    def sweep(_, carry):
        return jax.lax.fori_loop(0, m, row, carry)

    y, _ = jax.lax.fori_loop(0, sweeps, sweep, (x, jnp.zeros((m,), x.dtype)))
    return y


def gram_matrix(normals) -> np.ndarray:
    """G = AAᵀ [m, m] (computed once per polytope, in float64 then stored float32)."""
    a = np.asarray(normals, np.float64)
    return (a @ a.T).astype(np.float32)


def _one(x, normals, bounds, gram, interior, k: int, max_iters: int, tol: float):
    """The projection of one point x [d]; bounds [m] (module docstring)."""
    m = normals.shape[0]
    r0 = normals @ x - bounds                                   # > 0: violated
    inside = jnp.max(r0) <= tol

    def choose(score):
        val, idx = jax.lax.top_k(score, k)
        return idx, val > 0

    def solve(idx, mask):
        g = gram[idx][:, idx]
        both = mask[:, None] & mask[None, :]
        g = jnp.where(both, g, 0) + jnp.diag(jnp.where(mask, _RIDGE, 1.0))
        lam = jnp.linalg.solve(g, jnp.where(mask, r0[idx], 0))
        return jnp.where(mask, lam, 0)

    def residual(idx, lam):
        return r0 - gram[:, idx] @ lam                         # A y − b at y = x − Aᵀλ

    def next_set(idx, mask, lam, r):
        keep = jnp.zeros((m,), bool).at[idx].set(mask & (lam > 0))
        # kept rows first (by λ), then violated rows by how far they are violated
        score = jnp.where(keep, 1e20 + jnp.zeros_like(r), jnp.where(r > tol, r, -1.0))
        return choose(score)

    def body(state):
        i, idx, mask, _, _ = state
        lam = solve(idx, mask)
        r = residual(idx, lam)
        new_idx, new_mask = next_set(idx, mask, lam, r)
        same = jnp.all(jnp.sort(jnp.where(new_mask, new_idx, -1))
                       == jnp.sort(jnp.where(mask, idx, -1)))
        return i + 1, new_idx, new_mask, lam, same

    def cond(state):
        i, _, _, _, same = state
        return (i < max_iters) & ~same

    idx0, mask0 = choose(jnp.where(r0 > tol, r0, -1.0))
    lam0 = jnp.zeros((k,), x.dtype)
    iters, idx, mask, _, repeated = jax.lax.while_loop(
        cond, body, (jnp.int32(0), idx0, mask0, lam0, jnp.bool_(False)))
    lam = solve(idx, mask)                   # λ on the final set (== the last one when it repeated)
    y = x - jnp.where(mask, lam, 0) @ normals[idx]
    r = normals @ y - bounds
    violation = jnp.maximum(jnp.max(r), 0)
    # fallback: toward the interior point until every row holds
    rc = normals @ interior - bounds                            # < 0 on every active row
    over = r > 0
    theta = jnp.min(jnp.where(over, -rc / jnp.where(over, r - rc, 1), 1.0))
    theta = jnp.clip(theta, 0.0, 1.0)
    pulled = violation > tol
    y = jnp.where(pulled, interior + theta * (y - interior), y)
    y = jnp.where(inside, x, y)
    info = {"active": ~inside, "iterations": jnp.where(inside, 0, iters),
            "violation": jnp.where(inside, 0.0, violation), "pulled": pulled & ~inside,
            "converged": inside | (repeated & ~pulled)}
    return y, info


@functools.partial(jax.jit, static_argnames=("working_set", "max_iters", "tol"))
def project(x, normals, bounds, gram, interior, working_set: int = 16, max_iters: int = 16,
            tol: float = 1e-4):
    """x [N, d], bounds [m] or [N, m] → (y [N, d], info {active, iterations, violation,
    pulled, converged} each [N]). A batch with every point inside costs one matmul."""
    normals, gram, interior = (jnp.asarray(a, x.dtype) for a in (normals, gram, interior))
    n, m = x.shape[0], normals.shape[0]
    k = min(working_set, m)
    bounds = jnp.broadcast_to(bounds, (n, m)).astype(x.dtype)
    r0 = x @ normals.T - bounds
    run = functools.partial(_one, normals=normals, gram=gram, interior=interior, k=k,
                            max_iters=max_iters, tol=tol)

    def skip(_):
        zeros = jnp.zeros((n,), x.dtype)
        return x, {"active": zeros > 0, "iterations": jnp.zeros((n,), jnp.int32),
                   "violation": zeros, "pulled": zeros > 0, "converged": zeros == 0}

    def work(_):
        return jax.vmap(lambda v, b: run(v, bounds=b))(x, bounds)

    return jax.lax.cond(jnp.max(r0) <= tol, skip, work, None)


def max_violation(y, normals, bounds) -> np.ndarray:
    """max_j (a_j·y − b_j) per point of y [N, d] in float64 (≤ 0: inside)."""
    y = np.asarray(y, np.float64)
    b = np.broadcast_to(np.asarray(bounds, np.float64), (y.shape[0], normals.shape[0]))
    return (y @ np.asarray(normals, np.float64).T - b).max(axis=1)
