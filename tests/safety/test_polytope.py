"""The safety polytope and its final-state transform (perspective_jax.safety.polytope).

A polytope of 24 support rows in d = 16 and 5 flagged tokens of a random head table
[40, 16] (rows of norm 0.5–2). After `SafetyProjection`, every ACTIVE flagged token's
logit x·E_t is at most its cap (+ tol·|E_t|, the row being E_t/|E_t|), every support
row holds, and converged points are the nearest point of the rows on (float64
reference); inactive rows leave a point alone.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from polytope_cases import ldp_projection, unit
from perspective_jax.errors import UserError
from perspective_jax.safety.polytope import Polytope, PolytopeArrays, SafetyProjection
from perspective_jax.safety.project import INACTIVE, max_violation

D, V, S = 16, 40, 24
B, T = 2, 3
TOL = SafetyProjection().tol
FLAG_TOKENS = np.array([3, 7, 11, 20, 33], np.int32)


def make_polytope(rng, **change) -> Polytope:
    fields = dict(support_normals=unit(rng.normal(size=(S, D))).astype(np.float32),
                  support_bounds=rng.uniform(2.0, 4.0, size=S).astype(np.float32),
                  eps=0.1, flagged=("os.system", "é"), flag_tokens=FLAG_TOKENS,
                  flag_caps=rng.uniform(0.5, 1.5, size=len(FLAG_TOKENS)).astype(np.float32),
                  interior=np.zeros(D, np.float32), meta={"anchors": 3})
    fields.update(change)
    return Polytope(**fields)


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    table = (unit(rng.normal(size=(V, D))) * rng.uniform(0.5, 2.0, size=(V, 1))).astype(np.float32)
    poly = make_polytope(rng)
    return rng, table, poly, poly.arrays(table)


def rows_on(poly, table, mask):
    """Float64 (normals, bounds) of the support rows and the flagged rows in `mask`."""
    sn, sb = poly.support_rows()
    e = table[FLAG_TOKENS].astype(np.float64)
    fn = e / np.linalg.norm(e, axis=1, keepdims=True)
    fb = poly.flag_caps / np.linalg.norm(e, axis=1)
    return (np.concatenate([sn, fn[mask]]).astype(np.float64),
            np.concatenate([sb, fb[mask]]).astype(np.float64))


def test_arrays_hold_the_support_and_flag_rows(setup):
    _, table, poly, arrays = setup
    m = S + len(FLAG_TOKENS)
    assert arrays.normals.shape == (m, D) and arrays.bounds.shape == (m,)
    assert arrays.n_support == S and np.asarray(arrays.active).all()
    np.testing.assert_allclose(np.linalg.norm(np.asarray(arrays.normals), axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(np.asarray(arrays.bounds[:S]), poly.support_bounds + 0.1, atol=1e-6)
    n = np.asarray(arrays.normals, np.float64)
    np.testing.assert_allclose(np.asarray(arrays.gram), n @ n.T, atol=1e-6)
    # the flagged row is the logit cap: n·x ≤ b ⇔ x·E_t ≤ cap_t
    x = np.random.default_rng(1).normal(size=(100, D))
    norms = np.linalg.norm(table[FLAG_TOKENS].astype(np.float64), axis=1)
    np.testing.assert_allclose((x @ n[S:].T - np.asarray(arrays.bounds[S:])) * norms,
                               x @ table[FLAG_TOKENS].T.astype(np.float64) - poly.flag_caps,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_active_flagged_logits_are_capped_after_the_projection(setup, jit):
    rng, table, poly, arrays = setup
    r = np.random.default_rng(5)
    xn = (3.0 * r.normal(size=(B, T, D))).astype(np.float32)
    # make every flagged token's logit exceed its cap somewhere: x += k·E_t
    for f, t in enumerate(FLAG_TOKENS):
        xn[f % B, f % T] += 2.0 * table[t] / np.linalg.norm(table[t]) ** 2 * poly.flag_caps[f]
    mask = r.random(size=(B, T, len(FLAG_TOKENS))) < 0.6
    mask[0, 0] = True
    state = arrays.with_active(mask)
    transform = SafetyProjection()
    run = jax.jit(transform) if jit else transform
    y, info = run(jnp.asarray(xn), state)
    y = np.asarray(y, np.float64)
    assert y.shape == xn.shape and set(info) == {"active", "iterations", "violation",
                                                 "pulled", "converged"}
    assert all(v.shape == (B, T) for v in info.values())
    logits = y @ table.T.astype(np.float64)
    caps = poly.flag_caps + TOL * np.linalg.norm(table[FLAG_TOKENS].astype(np.float64), axis=1)
    before = xn.astype(np.float64) @ table[FLAG_TOKENS].T.astype(np.float64)
    assert (before[mask] > poly.flag_caps[np.nonzero(mask)[2]]).any()   # something to cap
    for b in range(B):
        for t in range(T):
            on = mask[b, t]
            assert (logits[b, t, FLAG_TOKENS[on]] <= caps[on]).all(), (b, t)
            normals, bounds = rows_on(poly, table, on)
            assert max_violation(y[b, t][None], normals, bounds)[0] <= TOL
            if info["converged"][b, t]:
                ref = ldp_projection(xn[b, t].astype(np.float64), normals, bounds)
                dist = max(1.0, float(np.linalg.norm(xn[b, t] - ref)))
                assert np.linalg.norm(y[b, t] - ref) <= 1e-5 * dist + 5 * TOL
    assert np.asarray(info["converged"]).sum() >= B * T // 2


def test_inactive_rows_leave_an_inside_point_alone(setup):
    """A state inside every support row whose flagged logits all exceed their caps:
    with every flagged row off it is returned bit for bit; with them on it is moved
    and capped."""
    _, table, poly, arrays = setup
    e = table[FLAG_TOKENS].astype(np.float64)
    sn, sb = poly.support_rows()
    # x maximising min_f (x·E_f − cap_f) with every support row held by 0.1 (an LP)
    f = len(FLAG_TOKENS)
    lp = scipy.optimize.linprog(
        np.r_[np.zeros(D), -1.0],
        A_ub=np.block([[sn.astype(np.float64), np.zeros((S, 1))], [-e, np.ones((f, 1))]]),
        b_ub=np.r_[sb - 0.1, -poly.flag_caps], bounds=[(None, None)] * D + [(None, 1.0)],
        method="highs")
    assert lp.status == 0 and lp.x[-1] > 0.1
    xn = np.broadcast_to(lp.x[:D], (B, T, D)).astype(np.float32).copy()
    assert (xn[0, 0] @ e.T > poly.flag_caps).all()
    assert max_violation(xn[0, 0][None], sn, sb)[0] < 0
    off = SafetyProjection()(jnp.asarray(xn), arrays.with_active(np.zeros(len(FLAG_TOKENS), bool)))
    np.testing.assert_array_equal(np.asarray(off[0]), xn)
    assert not np.asarray(off[1]["active"]).any()
    on, info = SafetyProjection()(jnp.asarray(xn), arrays)
    assert np.asarray(info["active"]).all()
    caps = poly.flag_caps + TOL * np.linalg.norm(e, axis=1)
    assert (np.asarray(on, np.float64) @ e.T <= caps).all()


@pytest.mark.parametrize("b,t", [(3, 3), (2, 5)])
def test_row_bounds_for_masks_of_every_shape(setup, b, t):
    """[F] for every position, [B, F] per sequence (not per position, even when B = T),
    [B, T, F] per position; inactive flagged rows get INACTIVE, support rows never."""
    _, _, _, arrays = setup
    f = len(FLAG_TOKENS)
    bounds = np.asarray(arrays.bounds)
    r = np.random.default_rng(b * 10 + t)
    for mask in (r.random(f) < 0.5, r.random((b, f)) < 0.5, r.random((b, t, f)) < 0.5):
        full = np.broadcast_to(mask[:, None, :] if mask.ndim == 2 else mask, (b, t, f))
        want = np.concatenate([np.broadcast_to(bounds[:S], (b, t, S)),
                               np.where(full, bounds[S:], INACTIVE)], axis=-1)
        got = arrays.with_active(mask).row_bounds((b, t))
        assert got.shape == (b, t, S + f)
        np.testing.assert_array_equal(np.asarray(got), want.astype(np.float32))
    got = arrays.with_active(np.array([True, False, True, False, False])).row_bounds((7,))
    assert got.shape == (7, S + f)
    np.testing.assert_array_equal(np.asarray(got[:, S + 1]), np.float32(INACTIVE))


def test_a_polytope_without_flagged_tokens(setup):
    rng, table, _, _ = setup
    poly = make_polytope(rng, flag_tokens=np.zeros(0, np.int32),
                         flag_caps=np.zeros(0, np.float32), flagged=())
    arrays = poly.arrays(table)
    assert arrays.normals.shape == (S, D) and arrays.active.shape == (0,)
    assert arrays.row_bounds((B, T)).shape == (B, T, S)


def one_line_error(fn, *match):
    with pytest.raises(UserError) as exc:
        fn()
    text = str(exc.value)
    assert "\n" not in text and all(m in text for m in match), text
    return text


def test_arrays_refuse_an_interior_point_that_is_not_inside(setup):
    rng, table, poly, _ = setup
    n0 = poly.support_normals[0]
    outside = (poly.support_bounds[0] + 0.2) * n0              # beyond support row 0 + ε
    one_line_error(lambda: make_polytope(rng, interior=outside.astype(np.float32)).arrays(table),
                   "interior point")
    caps = poly.flag_caps.copy()
    caps[2] = -0.1                                             # logit 0 at 0 > cap: outside
    one_line_error(lambda: make_polytope(rng, flag_caps=caps).arrays(table), "interior point")
    # the interior 0 is inside every row by min_j b_j: accepted with a margin below it
    slack = float(np.min(np.asarray(poly.arrays(table).bounds)))
    poly.arrays(table, margin=0.99 * slack)
    one_line_error(lambda: poly.arrays(table, margin=1.01 * slack), "interior point")


def test_bad_inputs_are_one_line_user_errors(setup):
    rng, table, poly, arrays = setup
    one_line_error(lambda: poly.arrays(table[:, :8]), "head")
    one_line_error(lambda: poly.arrays(table[:30]), "vocabulary")
    one_line_error(lambda: make_polytope(rng, support_bounds=np.ones(3, np.float32)), "bounds")
    one_line_error(lambda: make_polytope(rng, interior=np.zeros(3, np.float32)), "interior")
    one_line_error(lambda: make_polytope(rng, flag_caps=np.ones(2, np.float32)), "cap")
    for eps in (-0.1, float("nan"), float("inf")):
        one_line_error(lambda: make_polytope(rng, eps=eps), "eps")
    one_line_error(lambda: arrays.with_active(np.ones(4, bool)), "flag mask")
    one_line_error(lambda: SafetyProjection()(jnp.zeros((B, T, D)), None), "final_state")
    for bad in (dict(working_set=0), dict(max_iters=0), dict(tol=0.0)):
        one_line_error(lambda: SafetyProjection(**bad), "SafetyProjection")
    assert isinstance(arrays, PolytopeArrays)
