"""Euclidean projection onto a polytope {y : a_j·y ≤ b_j, j = 1..m} (unit rows a_j).

    y, info = project(x, normals, bounds, gram, interior)      # x [N, d]; the fast path
    y = dykstra(x, normals, bounds, sweeps=2000)               # the reference

`dykstra`: cyclic Dykstra over every half-space (for half-spaces it is Hildreth's
dual coordinate ascent); converges to the projection; slow but simple.

`project`: the dual active-set method of Goldfarb and Idnani for this problem
(Hessian I). Starting from y = x with no active rows, it takes the most violated row
p, moves y along z = a_p minus its part in the span of the active rows (so active rows
stay tight) and shifts the multipliers (u_A −= t·r, u_p += t, r = (NᵀN)⁻¹Nᵀa_p); the
step t is the smaller of the full step (a_p·y = b_p: p joins the active set) and the
largest step keeping every u ≥ 0 (the row whose multiplier reaches 0 leaves, p stays
pending). Every step raises the dual objective, so it ends after finitely many steps
with the exact projection (KKT: y = x − Σ u_j a_j, u ≥ 0, tight active rows, every
row satisfied) — `info["converged"]`. At most `working_set` rows are active at once
and `max_iters` steps are taken; if either bound is hit first, whatever violation is
left is reported and removed by moving y toward `interior` (a point strictly inside)
just far enough: y' = c + θ(y − c), θ = min_j (b_j − a_j·c)/(a_j·y − a_j·c) over
violated rows. So every output is inside (a_j·y' ≤ b_j + tol) by construction; an
output with `converged` False is inside but not necessarily the nearest point.

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
_RIDGE = 1e-6
# full float32 products: on GPUs XLA's default (TF32) would blur a row check by ~1e-3
_HI = jax.lax.Precision.HIGHEST         # added to G_SS's diagonal: duplicate or dependent rows stay solvable


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
    r0 = jnp.dot(normals, x, precision=_HI) - bounds                                   # > 0: violated
    inside = jnp.max(r0) <= tol

    def dual_direction(idx, mask, p):
        """r = (NᵀN)⁻¹Nᵀa_p over the active rows N (zero elsewhere)."""
        g = gram[idx][:, idx]
        both = mask[:, None] & mask[None, :]
        g = jnp.where(both, g, 0) + jnp.diag(jnp.where(mask, _RIDGE, 1.0))
        return jnp.where(mask, jnp.linalg.solve(g, jnp.where(mask, gram[idx, p], 0)), 0)

    def body(st):
        it, y, idx, mask, u, p, up, pending, status = st
        s = jnp.dot(normals, y, precision=_HI) - bounds
        worst = jnp.argmax(s).astype(jnp.int32)
        p = jnp.where(pending, p, worst)
        done = ~pending & (s[worst] <= tol)
        up = jnp.where(pending, up, 0.0)
        r = dual_direction(idx, mask, p)
        z = normals[p] - jnp.dot(r, normals[idx], precision=_HI)                      # a_p off the active span
        zz = jnp.dot(z, normals[p])                             # = |z|²
        t2 = jnp.where(zz > _RIDGE, s[p] / jnp.where(zz > _RIDGE, zz, 1.0), jnp.inf)
        ratios = jnp.where(mask & (r > 0), u / jnp.where(r > 0, r, 1.0), jnp.inf)
        j = jnp.argmin(ratios)
        t = jnp.minimum(ratios[j], t2)
        full = t2 <= ratios[j]
        free = jnp.argmin(mask)                                 # first unused slot
        stuck = ~jnp.isfinite(t) | (full & jnp.all(mask))      # infeasible / set is full
        y2 = y - jnp.where(zz > _RIDGE, t, 0.0) * z
        u2 = jnp.where(mask, u - t * r, 0.0)
        up2 = up + t
        # a full step adds p to the active set; a partial step drops row j, p stays pending
        idx2 = jnp.where(full, idx.at[free].set(p), idx)
        mask2 = jnp.where(full, mask.at[free].set(True), mask.at[j].set(False))
        u2 = jnp.where(full, u2.at[free].set(up2), u2.at[j].set(0.0))
        keep = done | stuck
        new = (it + 1, y2, idx2, mask2, u2, p, jnp.where(full, 0.0, up2), ~full,
               jnp.int32(0))
        old = (it, y, idx, mask, u, p, up, pending,
               jnp.where(done, jnp.int32(1), jnp.int32(2)))
        return jax.tree.map(lambda a, b: jnp.where(keep, a, b), old, new)

    def cond(st):
        return (st[0] < max_iters) & (st[-1] == 0)

    zeros_k = jnp.zeros((k,), x.dtype)
    start = (jnp.int32(0), x, jnp.zeros((k,), jnp.int32), zeros_k > 0, zeros_k,
             jnp.int32(0), jnp.zeros((), x.dtype), jnp.bool_(False), jnp.int32(0))
    iters, y, *_, status = jax.lax.while_loop(cond, body, start)
    r = jnp.dot(normals, y, precision=_HI) - bounds
    violation = jnp.maximum(jnp.max(r), 0)
    # fallback: toward the interior point until every row holds
    rc = jnp.dot(normals, interior, precision=_HI) - bounds                            # < 0 on every active row
    over = r > 0
    theta = jnp.min(jnp.where(over, -rc / jnp.where(over, r - rc, 1), 1.0))
    theta = jnp.clip(theta, 0.0, 1.0)
    pulled = violation > tol
    y = jnp.where(pulled, interior + theta * (y - interior), y)
    y = jnp.where(inside, x, y)
    info = {"active": ~inside, "iterations": jnp.where(inside, 0, iters),
            "violation": jnp.where(inside, 0.0, violation), "pulled": pulled & ~inside,
            "converged": inside | ((status == 1) & ~pulled)}
    return y, info


@functools.partial(jax.jit, static_argnames=("working_set", "max_iters", "tol"))
def project(x, normals, bounds, gram, interior, working_set: int = 16, max_iters: int = 32,
            tol: float = 1e-4):
    """x [N, d], bounds [m] or [N, m] → (y [N, d], info {active, iterations, violation,
    pulled, converged} each [N]). A batch with every point inside costs one matmul."""
    normals, gram, interior = (jnp.asarray(a, x.dtype) for a in (normals, gram, interior))
    n, m = x.shape[0], normals.shape[0]
    k = min(working_set, m)
    bounds = jnp.broadcast_to(bounds, (n, m)).astype(x.dtype)
    r0 = jnp.dot(x, normals.T, precision=_HI) - bounds
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
