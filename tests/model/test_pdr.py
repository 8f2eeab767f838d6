"""PDR scans against a float64 sequential reference (SPEC §3.1 validation plan)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.pdr_scan import PDR_IMPLS as IMPLS, pdr_scan
from kernels_pallas.pdr_xla import pdr_chunked, pdr_chunked_matmul, pdr_sequential, pdr_step


def numpy_reference(lam, k, q, v, s0):
    """Sequential loop in float64: S_t = diag(exp λ_t) S_{t-1} + v_t k_tᵀ, y_t = S_t q_t."""
    b, t, d = v.shape
    s = s0.astype(np.float64).copy()
    ys = np.zeros((b, t, d))
    for i in range(t):
        s = np.exp(lam[:, i])[:, :, None] * s + v[:, i, :, None] * k[:, i, None, :]
        ys[:, i] = np.einsum("bdr,br->bd", s, q[:, i])
    return ys, s


def make_inputs(seed, b, t, d, r, lo, hi):
    rng = np.random.default_rng(seed)
    p = rng.uniform(lo, hi, (b, t, d))
    lam = -np.logaddexp(0.0, -p)                       # log sigmoid(p), float64
    k = rng.normal(size=(b, t, r)) / np.sqrt(r)
    q = rng.normal(size=(b, t, r))
    v = rng.normal(size=(b, t, d))
    s0 = rng.normal(size=(b, d, r))
    return lam, k, q, v, s0


f32 = lambda arrays: [jnp.asarray(a, jnp.float32) for a in arrays]


@pytest.mark.parametrize("lo,hi", [(-4.0, 4.0), (-4.0, -3.5), (3.5, 4.0)])
def test_chunked_matches_float64_reference_1024_tokens(lo, hi):
    inputs = make_inputs(0, 2, 1024, 24, 8, lo, hi)
    y_ref, s_ref = numpy_reference(*inputs)
    y, s = jax.jit(pdr_chunked)(*f32(inputs))
    assert np.abs(np.asarray(y) - y_ref).max() < 1e-4
    assert np.abs(np.asarray(s) - s_ref).max() < 1e-4


def test_chunked_stable_for_tiny_and_near_one_decays():
    """sigmoid(−10) and sigmoid(10): the factorised form would overflow here."""
    for lo, hi in [(-10.5, -9.5), (9.5, 10.5)]:
        inputs = make_inputs(1, 1, 256, 16, 4, lo, hi)
        y_ref, _ = numpy_reference(*inputs)
        y, _ = jax.jit(pdr_chunked)(*f32(inputs))
        scale = max(1.0, np.abs(y_ref).max())
        assert np.isfinite(np.asarray(y)).all()
        assert np.abs(np.asarray(y) - y_ref).max() / scale < 1e-5


# The decay ranges the model produces: log sigmoid(p) from sigmoid(-10) up to the
# 0.99999 cap, mixed, and far below the range (sigmoid(-30)).
DECAY_RANGES = [(-4.0, 4.0), (-10.5, -9.5), (9.5, 14.0), (-10.0, 14.0), (-30.0, -20.0)]


@pytest.mark.parametrize("lo,hi", DECAY_RANGES)
@pytest.mark.parametrize("chunk,sub", [(16, 4), (64, 8)])          # (32, 8): the gradient test
def test_matmul_form_matches_float64_reference_on_every_decay_range(lo, hi, chunk, sub):
    """The matmul-shaped chunk (factors ≤ 1 off the diagonal blocks) is as exact as
    the pairwise form wherever the factored form would overflow (c·|λ| > 88)."""
    inputs = make_inputs(6, 2, 200, 16, 4, lo, hi)
    inputs[0][...] = np.minimum(inputs[0], np.log(0.99999))        # the model's cap
    y_ref, s_ref = numpy_reference(*inputs)
    y, s = jax.jit(lambda *a: pdr_chunked_matmul(*a, chunk=chunk, sub=sub))(*f32(inputs))
    scale = max(1.0, np.abs(y_ref).max())
    assert np.isfinite(np.asarray(y)).all() and np.isfinite(np.asarray(s)).all()
    assert np.abs(np.asarray(y) - y_ref).max() / scale < 2e-5
    assert np.abs(np.asarray(s) - s_ref).max() / max(1.0, np.abs(s_ref).max()) < 2e-5


def test_matmul_form_refuses_a_sub_block_that_does_not_divide_the_chunk():
    with pytest.raises(ValueError, match="does not divide"):
        pdr_chunked_matmul(*f32(make_inputs(0, 1, 8, 4, 2, -1, 1)), chunk=16, sub=5)


@pytest.mark.parametrize("t,chunk", [(100, 16), (37, 8), (5, 16)])
def test_all_impls_agree_on_ragged_lengths(t, chunk):
    inputs = f32(make_inputs(2, 2, t, 12, 4, -4, 4))
    y_ref, s_ref = numpy_reference(*make_inputs(2, 2, t, 12, 4, -4, 4))
    for impl in IMPLS:
        y, s = pdr_scan(*inputs, impl=impl, chunk=chunk)
        np.testing.assert_allclose(np.asarray(y), y_ref, atol=2e-5, rtol=1e-5, err_msg=impl)
        np.testing.assert_allclose(np.asarray(s), s_ref, atol=2e-5, rtol=1e-5, err_msg=impl)


@pytest.mark.parametrize("form,inputs", [
    ("chunked", (3, 2, 1024, 16, 8, -4, 4)),
    ("matmul", (7, 2, 96, 16, 8, -10, 14)),          # sigmoid(-10) up to the cap
], ids=["chunked", "matmul"])
def test_chunked_gradients_match_float64_sequential(form, inputs):
    fn = pdr_chunked if form == "chunked" else \
        (lambda *a: pdr_chunked_matmul(*a, chunk=32, sub=8))
    lam, k, q, v, s0 = make_inputs(*inputs)
    lam = np.minimum(lam, np.log(0.99999))                      # the model's cap
    cot = np.random.default_rng(9).normal(size=v.shape)

    def loss(fn, lam, k, q, v, s0, cot):
        y, s = fn(lam, k, q, v, s0)
        return jnp.sum(y * cot) + jnp.sum(s)

    argnums = (0, 1, 2, 3, 4)
    with jax.enable_x64(True):
        ref = jax.grad(lambda *a: loss(pdr_sequential, *a), argnums)(
            *[jnp.asarray(a, jnp.float64) for a in (lam, k, q, v, s0, cot)])
        ref = [np.asarray(g) for g in ref]
    got = jax.jit(jax.grad(lambda *a: loss(fn, *a), argnums))(
        *f32((lam, k, q, v, s0, cot)))
    for name, g, r in zip(("log_decay", "k", "q", "v", "state"), got, ref):
        g = np.asarray(g)
        assert np.isfinite(g).all(), name
        err = np.abs(g - r).max() / max(1.0, np.abs(r).max())
        assert err < 1e-4, (name, err)


def test_gradients_finite_for_extreme_decays():
    lam, k, q, v, s0 = f32(make_inputs(4, 1, 64, 8, 4, -12, 12))
    grads = jax.grad(lambda *a: jnp.sum(pdr_chunked(*a)[0] ** 2), (0, 1, 2, 3))(
        lam, k, q, v, s0)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()


def test_step_form_matches_scan():
    lam, k, q, v, s0 = f32(make_inputs(5, 2, 20, 8, 4, -3, 3))
    y_scan, s_scan = pdr_sequential(lam, k, q, v, s0)
    s = s0
    for t in range(20):
        y, s = pdr_step(lam[:, t], k[:, t], q[:, t], v[:, t], s)
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_scan[:, t]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(s), np.asarray(s_scan), atol=1e-5)


def test_ten_thousand_constant_steps_stay_finite():
    """Constant input, decay close to 1: the state converges to v kᵀ / (1 − γ)."""
    d, r, t = 8, 4, 10_000
    gamma = 0.999
    lam = jnp.full((1, t, d), np.log(gamma), jnp.float32)
    k = jnp.ones((1, t, r), jnp.float32)
    q = jnp.ones((1, t, r), jnp.float32)
    v = jnp.ones((1, t, d), jnp.float32)
    y, s = jax.jit(pdr_chunked)(lam, k, q, v, jnp.zeros((1, d, r)))
    assert np.isfinite(np.asarray(y)).all() and np.isfinite(np.asarray(s)).all()
    limit = (1 - gamma ** t) / (1 - gamma)
    np.testing.assert_allclose(np.asarray(s), limit, rtol=1e-3)


def test_auto_impl_picks_pallas_only_on_gpu_where_tiles_fit(monkeypatch):
    from kernels_pallas import pdr_scan as mod
    assert mod.resolve_impl("auto", 256, 64, 16) == "matmul"         # this CPU, d >= 256
    assert mod.resolve_impl("auto", 128, 32, 16) == "chunked"        # below it
    assert mod.resolve_impl("auto", 256, 64, 18) == "chunked"        # 4 does not divide 18
    assert mod.resolve_impl("scan", 256, 64, 16) == "scan"
    assert mod.pallas_block_d(256, 64, 16) == 32
    assert mod.pallas_block_d(48, 64, 16) == 16
    for d, r, chunk in ((256, 48, 16), (256, 8, 16), (256, 64, 8), (40, 64, 16)):
        assert mod.pallas_block_d(d, r, chunk) is None, (d, r, chunk)
    monkeypatch.setattr(mod.jax, "default_backend", lambda: "gpu")
    assert mod.resolve_impl("auto", 256, 64, 16) == "pallas"
    assert mod.resolve_impl("auto", 40, 64, 16) == "chunked"
