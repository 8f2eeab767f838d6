"""Projection onto a polytope (perspective_jax.safety.project) against float64 references.

Random polytopes (unit rows, some duplicated, some nearly parallel) in d = 8/16/64
with m = 5…200 rows, 16 points each (`polytope_cases.sample_points`: far outside,
outside, just beyond a face, on a face, inside, just beyond a corner). Checked:
membership always (also with max_iters 1–2, where the pull toward the interior
fires); inside points unchanged bit for bit; idempotence; the fast projection equals
the reference (least-distance programming by NNLS, itself checked against SLSQP and
its KKT conditions) wherever it reports `converged`, and its output satisfies the KKT
conditions there (an NNLS on the tight rows: x − y = Aᵀλ, λ ≥ 0); Dykstra equals the
reference; per-point bounds with INACTIVE rows; vmap/jit.

Tolerances: membership a_j·y ≤ b_j + TOL (project's tol). Where converged,
|y − y*| ≤ REL·max(1, |x − y*|) + 5·TOL: float32 rounding, plus the rows violated by
less than tol that the active-set step leaves out of its working set (they move y by
O(tol)). Every compile of `project` is keyed by (N, d, m, working_set, max_iters), so
the cases share N = 16 and each case runs only the settings listed for it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polytope_cases import (kkt_residual, ldp_projection, random_polytope, sample_points,
                            slsqp_projection, vertex_polytope)
from perspective_jax.safety.project import (INACTIVE, dykstra, gram_matrix, max_violation,
                                            project)

TOL = 1e-4
REL = 1e-5
DEFAULT = (16, 32)                      # (working_set, max_iters): SafetyProjection's
# name: (d, m, duplicate rows, nearly parallel rows, settings beyond DEFAULT); the
# iteration caps 1 and 2 stop the step early, so the pull toward the interior fires
CASES = {"d8_m5": (8, 5, 0, 0, ()),                  # fewer rows than the working set
         "d8_m40": (8, 40, 4, 4, ((16, 1),)),
         "d16_m60": (16, 60, 4, 4, ((16, 2),)),
         "d64_m200": (64, 200, 6, 6, ((16, 1),))}


class Case:
    """One polytope, its 16 points, their reference projections, `project`'s outputs."""

    def __init__(self, name, d, m, dup, near, settings):
        rng = np.random.default_rng(1000 * d + m)
        self.name, self.settings = name, (DEFAULT, *settings)
        self.a, self.b, self.c = random_polytope(rng, d, m, dup, near)
        x64, self.kinds = sample_points(rng, self.a, self.b, self.c)
        self.x = x64.astype(np.float32)
        self.ref = np.array([ldp_projection(x, self.a, self.b)
                             for x in self.x.astype(np.float64)])
        self.dist = np.linalg.norm(self.x - self.ref, axis=1)
        self.arrays = (self.a.astype(np.float32), self.b.astype(np.float32),
                       gram_matrix(self.a), self.c.astype(np.float32))
        self.out = {}

    def run(self, x, setting=DEFAULT, bounds=None):
        a, b, g, c = self.arrays
        y, info = project(jnp.asarray(x), a, b if bounds is None else bounds, g, c,
                          working_set=setting[0], max_iters=setting[1])
        return np.asarray(y), jax.tree.map(np.asarray, info)

    def result(self, setting):
        if setting not in self.out:
            self.out[setting] = self.run(self.x, setting)
        return self.out[setting]

    def results(self):
        return [(s, *self.result(s)) for s in self.settings]

    def error(self, y):
        return np.linalg.norm(y.astype(np.float64) - self.ref, axis=1)

    def allowed(self):
        return REL * np.maximum(1.0, self.dist) + 5 * TOL

    def wrong(self, y, info):
        """Outputs ending inside without the pull yet clearly not the nearest point."""
        far = self.error(y) > 1e-2 * self.dist + 1e-3
        return info["active"] & ~info["pulled"] & far


@pytest.fixture(scope="module")
def cases():
    return {name: Case(name, *spec) for name, spec in CASES.items()}


def test_reference_is_the_projection(cases):
    """The float64 reference itself: feasible, KKT to rounding, and equal to SLSQP's
    answer (an unrelated solver) on the cases small enough for it."""
    for case in cases.values():
        assert max_violation(case.ref, case.a, case.b).max() <= 1e-9
        for x, r in zip(case.x.astype(np.float64), case.ref):
            assert kkt_residual(x, r, case.a, case.b, 1e-9) <= 1e-9
        if case.a.shape[1] <= 16:
            other = np.array([slsqp_projection(x, case.a, case.b)
                              for x in case.x.astype(np.float64)])
            np.testing.assert_allclose(other, case.ref, atol=1e-8)


def test_every_output_is_inside(cases):
    pulled = {}
    for case in cases.values():
        for setting, y, info in case.results():
            assert np.isfinite(y).all()
            assert max_violation(y, case.a, case.b).max() <= TOL, (case.name, setting)
            np.testing.assert_allclose(info["violation"][~info["pulled"]],
                                       np.maximum(max_violation(y, case.a, case.b), 0)
                                       [~info["pulled"]], atol=1e-5)
            pulled[setting] = pulled.get(setting, 0) + int(info["pulled"].sum())
    assert pulled[(16, 1)] > 0 and pulled[(16, 2)] > 0   # the pull fired, and held


def test_inside_points_are_returned_bit_for_bit(cases):
    """On a face (within float32 rounding) or strictly inside: unchanged, inactive,
    in a mixed batch (per point) and in an all-inside batch (the batch-level skip)."""
    for case in cases.values():
        y, info = case.result(DEFAULT)
        keep = np.isin(case.kinds, ["on_face", "inside"])
        np.testing.assert_array_equal(y[keep], case.x[keep])
        assert not info["active"][keep].any() and info["converged"][keep].all()
        assert (info["iterations"][keep] == 0).all() and (info["violation"][keep] == 0).all()
        assert info["active"][~keep].all()      # every other kind starts outside
        inner = np.tile(case.x[keep], (4, 1))               # [16, d]: the same compile
        y2, info2 = case.run(inner)
        np.testing.assert_array_equal(y2, inner)
        assert not info2["active"].any() and not info2["pulled"].any()


def test_converged_outputs_equal_the_reference_projection(cases):
    n_conv = n_active = 0
    for case in cases.values():
        tight = (np.abs(case.ref @ case.a.T - case.b) < 1e-7).sum(axis=1)
        for setting, y, info in case.results():
            conv = info["converged"]
            assert not (conv & info["pulled"]).any()
            ok = case.error(y) <= case.allowed()
            assert ok[conv].all(), (case.name, setting, case.error(y)[conv & ~ok])
            if setting == DEFAULT:
                # the exact method ends before its bounds whenever the projection's
                # active rows fit the working set
                fits = info["active"] & (tight <= setting[0])
                assert conv[fits].all(), (case.name, np.flatnonzero(fits & ~conv))
                n_conv += int((conv & info["active"]).sum())
                n_active += int(info["active"].sum())
    print(f"converged at the defaults: {n_conv} of {n_active} active points")
    assert n_conv >= n_active // 2


def test_a_step_stopped_early_is_pulled_or_exact(cases):
    """The dual method keeps its multipliers feasible, so a step stopped by max_iters
    (1 or 2 here) either already holds every row — then it is the projection — or is
    pulled toward the interior and reported so; it is never inside and wrong unflagged."""
    seen_pulled = False
    for case in cases.values():
        for setting, y, info in case.results():
            wrong = case.wrong(y, info)
            assert not wrong.any(), (case.name, setting)
            seen_pulled |= setting != DEFAULT and bool(info["pulled"].any())
    assert seen_pulled


def test_kkt_conditions_hold_where_converged(cases):
    """Second optimality check, in float64 and without the reference: on the rows
    tight at y (within TOL) there are λ ≥ 0 with x − y = Aᵀλ (NNLS); rows off them
    carry none (complementary slackness). A non-optimal output fails it."""
    for case in cases.values():
        for setting, y, info in case.results():
            wrong = case.wrong(y, info)
            for i in np.flatnonzero(info["active"]):
                res = kkt_residual(case.x[i], y[i], case.a, case.b, TOL)
                step = float(np.linalg.norm(case.x[i] - y[i]))
                if info["converged"][i]:
                    assert res <= 1e-5 * max(1.0, step), (case.name, setting, i, res)
                elif wrong[i]:
                    assert res > 1e-3           # the check tells a wrong point


def test_projecting_twice_changes_nothing(cases):
    for case in cases.values():
        for setting, y, _ in case.results():
            y2, info = case.run(y)
            np.testing.assert_array_equal(y2, y)
            assert not info["active"].any(), (case.name, setting)


def test_dykstra_equals_the_reference(cases):
    run = jax.jit(dykstra, static_argnames="sweeps")
    for name in ("d8_m5", "d16_m60"):
        case = cases[name]
        y = np.asarray(run(jnp.asarray(case.x), case.arrays[0], case.arrays[1], sweeps=2000))
        assert max_violation(y, case.a, case.b).max() <= 1e-5
        assert (case.error(y) <= 1e-4 * np.maximum(1.0, case.dist)).all(), name
        inside = case.kinds == "inside"
        np.testing.assert_allclose(y[inside], case.x[inside], atol=1e-6)


@pytest.mark.parametrize("d,m", [(8, 40), (64, 200)])
def test_a_point_beyond_a_vertex_projects_onto_it(d, m):
    """x = v + A_Sᵀμ, μ ≥ 0, with the d rows S tight at v: the projection is v. In
    d = 8 the working set (16) holds S: v, for μ up to 1 (farther out the step may
    not converge; then the output is inside and not reported converged). In d = 64
    it cannot hold the 64 tight rows: the pull fires and the output is inside."""
    rng = np.random.default_rng(d)
    a, b, c, v = vertex_polytope(rng, d, extra=m - d)
    mu = rng.uniform(0.1, 1.0, size=(16, d)) * np.repeat([1e-3, 1e-1, 1.0, 10.0], 4)[:, None]
    x = (v + mu @ a[:d]).astype(np.float32)
    y, info = project(jnp.asarray(x), a.astype(np.float32), b.astype(np.float32),
                      gram_matrix(a), c.astype(np.float32))
    y, info = np.asarray(y), jax.tree.map(np.asarray, info)
    assert max_violation(y, a, b).max() <= TOL
    assert info["active"].all()
    assert (np.linalg.norm(y - v, axis=1) <= 5 * TOL)[info["converged"]].all()
    if d <= 16:
        assert info["converged"][:12].all()
    else:
        assert info["pulled"].all() and not info["converged"].any()


def test_inactive_rows_never_bind(cases):
    """bounds [N, m]: each point switches off its own random half of the rows; the
    result is the projection onto the rows left on. A point violating only switched-
    off rows is returned bit for bit."""
    case = cases["d16_m60"]
    rng = np.random.default_rng(3)
    off = rng.random(size=(16, case.a.shape[0])) < 0.5
    bounds = np.where(off, INACTIVE, case.b).astype(np.float32)
    y, info = case.run(case.x, bounds=bounds)
    for i in range(16):
        on = ~off[i]
        ref = ldp_projection(case.x[i].astype(np.float64), case.a[on], case.b[on])
        assert max_violation(y[i:i + 1], case.a[on], case.b[on])[0] <= TOL
        if info["converged"][i]:
            dist = max(1.0, float(np.linalg.norm(case.x[i] - ref)))
            assert np.linalg.norm(y[i] - ref) <= REL * dist + 5 * TOL, i
    assert info["converged"].sum() >= 8
    # switch off exactly the rows each point violates: nothing is left to do
    viol = case.x.astype(np.float64) @ case.a.T > case.b
    y2, info2 = case.run(case.x, bounds=np.where(viol, INACTIVE, case.b).astype(np.float32))
    np.testing.assert_array_equal(y2, case.x)
    assert not info2["active"].any()


def test_vmap_and_jit_give_the_flat_batch_results(cases):
    case = cases["d8_m40"]
    a, b, g, c = case.arrays
    y_flat, info_flat = case.result(DEFAULT)
    f = jax.jit(jax.vmap(lambda xb: project(xb, a, b, g, c)))
    y, info = f(jnp.asarray(case.x.reshape(2, 8, -1)))
    assert y.shape == (2, 8, 8) and info["pulled"].shape == (2, 8)
    np.testing.assert_allclose(np.asarray(y).reshape(16, -1), y_flat, atol=1e-6)
    for key in ("active", "pulled", "converged", "iterations"):
        np.testing.assert_array_equal(np.asarray(info[key]).reshape(16), info_flat[key])
