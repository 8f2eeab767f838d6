"""Random polytopes, test points and float64 projection references (safety tests).

    A, b, c = random_polytope(rng, d, m, duplicates=3, near_parallel=3)   # unit rows, c inside
    x, kinds = sample_points(rng, A, b, c)      # [16, d]: far, out, beyond a face, on one, …
    A, b, c, v = vertex_polytope(rng, d, extra) # d rows tight at the vertex v
    y = ldp_projection(x, A, b)         # argmin |y − x|² s.t. Ay ≤ b, float64 (NNLS)
    y = slsqp_projection(x, A, b)       # the same by SLSQP (small cases)
    kkt_residual(x, y, A, b, tight)     # distance of x − y from the tight rows' cone

Two float64 references that share nothing with the code under test nor with each
other: least-distance programming through NNLS (exact active-set, Lawson & Hanson)
and SLSQP on the primal; the tests check that the first satisfies the KKT
conditions and agrees with the second.
"""

from __future__ import annotations

import numpy as np
import scipy.optimize


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def random_polytope(rng, d: int, m: int, duplicates: int = 0, near_parallel: int = 0,
                    slack=(0.2, 1.0)):
    """(A [m, d] unit rows, b [m], c [d]) with c strictly inside (slack in `slack`).
    The last `duplicates` rows copy earlier rows (half with the same bound, half with
    another); the `near_parallel` before them are earlier rows turned by ~1e-3 rad."""
    a = unit(rng.normal(size=(m, d)))
    base = m - duplicates - near_parallel
    assert base > 0
    for j in range(base, base + near_parallel):
        a[j] = unit(a[rng.integers(base)] + 1e-3 * unit(rng.normal(size=d)))
    src = rng.integers(base, size=duplicates)
    a[base + near_parallel:] = a[src]
    c = 0.3 * rng.normal(size=d)
    s = rng.uniform(*slack, size=m)
    for i, j in enumerate(range(base + near_parallel, m)):
        if i % 2 == 0:
            s[j] = s[src[i]]                        # an exact duplicate, same bound
    return a, a @ c + s, c


def boundary_point(rng, a, b, c):
    """A point on the polytope's boundary: from c along a random direction to the
    first face it meets (on that face, inside every other row)."""
    while True:
        u = unit(rng.normal(size=c.shape))
        rate = a @ u
        ok = rate > 1e-3
        if ok.any():
            return c + np.min((b - a @ c)[ok] / rate[ok]) * u


def corner(rng, a, b):
    """A vertex of the polytope (a random linear objective's minimiser) when m ≥ d,
    else the least-norm point on every face at once (the intersection of all rows)."""
    m, d = a.shape
    if m < d:
        return np.linalg.lstsq(a, b, rcond=None)[0]
    res = scipy.optimize.linprog(rng.normal(size=d), A_ub=a, b_ub=b, bounds=(None, None),
                                 method="highs")
    assert res.status == 0, res.message
    return res.x


def sample_points(rng, a, b, c):
    """[16, d] float64 points and their kinds: along random rays from c, 3 far outside
    (10× the polytope's extent along the ray), 2 at 3×, 2 at 2×, 3 just beyond a face,
    2 exactly on a face, 2 inside (0.5×); and 2 just beyond a corner (`corner`)."""
    rays = [boundary_point(rng, a, b, c) for _ in range(14)]
    scale = [10] * 3 + [3] * 2 + [2] * 2
    pts = ([c + s * (p - c) for s, p in zip(scale, rays)]
           + [p + 1e-3 * unit(p - c) for p in rays[7:10]] + rays[10:12]
           + [c + 0.5 * (p - c) for p in rays[12:14]])
    for _ in range(2):
        v = corner(rng, a, b)
        pts.append(v + 1e-2 * unit(v - c))
    kinds = ["far"] * 3 + ["out"] * 4 + ["beyond_face"] * 3 + ["on_face"] * 2 + \
        ["inside"] * 2 + ["corner"] * 2
    return np.array(pts), np.array(kinds)


def vertex_polytope(rng, d: int, extra: int):
    """(A, b, c, v): d rows tight at the vertex v, `extra` more rows with slack at v,
    c strictly inside. Any x = v + A_Sᵀμ (μ ≥ 0) projects exactly onto v."""
    while True:
        a_s = unit(rng.normal(size=(d, d)))
        if np.linalg.cond(a_s) < 50:
            break
    v = rng.normal(size=d)
    a_x = unit(rng.normal(size=(extra, d)))
    a = np.concatenate([a_s, a_x])
    b = np.concatenate([a_s @ v, a_x @ v + rng.uniform(0.5, 1.0, size=extra)])
    w = np.linalg.solve(a_s, -np.ones(d))          # a_j·(v + αw) = b_j − α on the tight rows
    alpha = 0.3 / max(1.0, float(np.max(np.abs(a_x @ w))))
    return a, b, v + alpha * w, v


def kkt_residual(x, y, a, b, tight: float) -> float:
    """min over λ ≥ 0 (NNLS) of |x − y − A_Sᵀλ| on the rows S with a_j·y ≥ b_j − tight:
    0 when x − y is in the normal cone of those rows, which with y feasible is the
    projection's optimality condition (complementary slackness: rows off S carry
    λ = 0). Absolute, in the units of x."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    step = x - y
    rows = np.flatnonzero(a @ y >= b - tight)
    if rows.size == 0:
        return float(np.linalg.norm(step))
    return float(scipy.optimize.nnls(a[rows].T, step)[1])


def ldp_projection(x, a, b) -> np.ndarray:
    """argmin_y |y − x|² s.t. a y ≤ b in float64, by Lawson & Hanson's least-distance
    programming through NNLS: with z = y − x the problem is min |z| s.t. Gz ≥ h,
    G = −a, h = a x − b; u = NNLS([Gᵀ; hᵀ], e_{d+1}), r = [Gᵀ; hᵀ]u − e_{d+1}, and
    z = −r[:d] / r[d] (a finite active-set method, exact up to rounding)."""
    x = np.asarray(x, np.float64)
    h = a @ x - b
    if np.max(h) <= 0:
        return x.copy()
    e = np.concatenate([-a.T, h[None, :]])
    f = np.zeros(len(e))
    f[-1] = 1.0
    u, _ = scipy.optimize.nnls(e, f, maxiter=50 * len(b))
    r = e @ u - f
    assert abs(r[-1]) > 1e-12, "infeasible"
    return x - r[:-1] / r[-1]


def slsqp_projection(x, a, b) -> np.ndarray:
    """The same projection by SLSQP on the primal (a second, unrelated solver; slow
    on degenerate vertices, so only for small cases)."""
    x = np.asarray(x, np.float64)
    res = scipy.optimize.minimize(
        lambda y: 0.5 * np.sum((y - x) ** 2), x, jac=lambda y: y - x, method="SLSQP",
        constraints=[{"type": "ineq", "fun": lambda y: b - a @ y, "jac": lambda y: -a}],
        options={"ftol": 1e-15, "maxiter": 500})
    return res.x
