"""Ternary quantisation-aware training pieces: values, STE gradients, schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perspective_jax.quant.ternary import (quantize_activations_int8, schedule_fraction,
                                           ternarize, ternary_ste)


def absmean_ternarize(w, eps: float = 1e-8):
    """Float64 numpy reference of BitNet b1.58: scale = mean|W|;
    trits = clip(round(W / scale), −1, 1)."""
    w = np.asarray(w, np.float64)
    scale = np.abs(w).mean(keepdims=True)
    return np.clip(np.round(w / (scale + eps)), -1, 1), scale.reshape(-1)


def test_ternarize_matches_numpy_absmean():
    w = jax.random.normal(jax.random.key(0), (3, 16, 24))
    out = np.asarray(ternarize(w))
    for e in range(3):
        trits, scale = absmean_ternarize(np.asarray(w[e]))
        np.testing.assert_allclose(out[e], trits * scale[0], rtol=1e-5, atol=1e-7)
        levels = np.unique(np.round(out[e] / scale[0], 5))
        assert set(levels.tolist()) <= {-1.0, 0.0, 1.0}


def test_ste_gradient_is_identity():
    w = jax.random.normal(jax.random.key(1), (2, 8, 8))
    cot = jax.random.normal(jax.random.key(2), w.shape)
    g = jax.grad(lambda w: jnp.sum(ternary_ste(w) * cot))(w)
    np.testing.assert_allclose(np.asarray(g), np.asarray(cot), rtol=1e-6)


def test_progressive_fraction_ternarises_the_largest_weights():
    w = jax.random.normal(jax.random.key(3), (1, 32, 32))
    assert np.array_equal(np.asarray(ternary_ste(w, 0.0)), np.asarray(w))
    np.testing.assert_allclose(np.asarray(ternary_ste(w, 1.0)), np.asarray(ternarize(w)),
                               atol=1e-6)  # w + (w_t − w) rounds within an ulp
    half = np.asarray(ternary_ste(w, 0.5))
    changed = np.abs(half - np.asarray(w)) > 1e-6
    assert abs(changed.mean() - 0.5) < 0.02
    # the changed half is the large-magnitude half
    assert np.abs(np.asarray(w))[changed].min() >= np.abs(np.asarray(w))[~changed].max()


def test_schedule_phases():
    sched = (0.0, 0.25, 0.5, 0.75, 1.0)
    got = [float(schedule_fraction(sched, s, 100)) for s in (0, 19, 20, 55, 80, 99, 150)]
    assert got == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0, 1.0]


def test_int8_activation_quantiser():
    x = jax.random.normal(jax.random.key(4), (4, 32))
    q = np.asarray(quantize_activations_int8(x))
    scale = np.abs(np.asarray(x)).max(-1, keepdims=True) / 127
    levels = q / scale
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert np.abs(q - np.asarray(x)).max() <= scale.max() / 2 + 1e-6


def test_all_zero_ternary_experts_give_zero_ffn_output(small_cfg):
    import dataclasses
    from perspective_jax.config import MoEConfig
    from perspective_jax.model.routed_ffn import RoutedFFN
    layer = RoutedFFN(dataclasses.replace(small_cfg, routed=True), MoEConfig())
    x = jax.random.normal(jax.random.key(5), (2, 8, small_cfg.d_model))
    params = layer.init(jax.random.key(6), x)["params"]
    params = jax.tree.map(lambda a: getattr(a, "value", a), params,
                          is_leaf=lambda a: hasattr(a, "value"))
    for name in ("w_gate", "w_up", "w_down"):
        params[name] = ternary_ste(jnp.zeros_like(params[name]))
    assert float(jnp.abs(layer.apply({"params": params}, x)[0]).max()) == 0.0


def _numpy_int8(a):
    scale = np.abs(a).max(-1, keepdims=True) / 127.0 + 1e-8
    return np.clip(np.round(a / scale), -127, 127) * scale


def test_int8_expert_activations_match_float64_reference(small_cfg):
    """activation_bits=8: each token's expert input and hidden activation are int8
    absmax fake-quantised — checked against a float64 numpy SwiGLU per token."""
    import dataclasses
    from perspective_jax.config import MoEConfig
    from perspective_jax.model.routed_ffn import RoutedFFN, TorusRouter
    cfg, moe = dataclasses.replace(small_cfg, routed=True), MoEConfig()
    x = jax.random.normal(jax.random.key(7), (2, 8, cfg.d_model))
    layer = RoutedFFN(cfg, moe, activation_bits=8)
    params = layer.init(jax.random.key(8), x)["params"]
    params = jax.tree.map(lambda a: getattr(a, "value", a), params,
                          is_leaf=lambda a: hasattr(a, "value"))
    y = np.asarray(layer.apply({"params": params}, x)[0]).reshape(-1, cfg.d_model)
    y_float = np.asarray(RoutedFFN(cfg, moe).apply({"params": params}, x)[0]).reshape(y.shape)
    idx, *_ = TorusRouter(cfg, moe).apply({"params": params["router"]}, x)
    xs = np.asarray(x, np.float64).reshape(-1, cfg.d_model)
    wg, wu, wd = (np.asarray(params[k], np.float64) for k in ("w_gate", "w_up", "w_down"))
    ref = np.zeros_like(xs)
    for n, e in enumerate(np.asarray(idx).reshape(-1)):
        xq = _numpy_int8(xs[n])
        g, u = xq @ wg[e], xq @ wu[e]
        ref[n] = _numpy_int8(g / (1 + np.exp(-g)) * u) @ wd[e]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    assert np.abs(y - y_float).max() > 1e-6          # quantisation is really applied
    # STE: the gradient with respect to the input exists and is finite
    gx = jax.grad(lambda x: jnp.sum(layer.apply({"params": params}, x)[0] ** 2))(x)
    assert np.isfinite(np.asarray(gx)).all() and float(jnp.abs(gx).max()) > 0


def test_activation_bits_config():
    import pytest
    from perspective_jax.config import TernaryConfig
    from perspective_jax.errors import UserError
    assert TernaryConfig(activation_bits=8).activation_bits == 8
    with pytest.raises(UserError, match="activation_bits"):
        TernaryConfig(activation_bits=4)


def test_row_granularity_scales_each_output_feature():
    w = jax.random.normal(jax.random.key(9), (2, 16, 6)) * jnp.arange(1, 7)   # columns differ
    wt = np.asarray(ternarize(w, "row"))
    for e in range(2):
        for n in range(6):
            scale = np.abs(np.asarray(w[e, :, n])).mean()
            levels = np.round(wt[e, :, n] / scale, 5)
            assert set(levels.tolist()) <= {-1.0, 0.0, 1.0}
    assert not np.allclose(wt, np.asarray(ternarize(w, "tensor")))
    import pytest
    with pytest.raises(ValueError, match="granularity"):
        ternarize(w, "block")


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
@pytest.mark.parametrize("ties", [False, True])
def test_magnitude_threshold_selects_what_the_quantile_selects(fraction, ties):
    """The bisection threshold keeps exactly the entries jnp.quantile's (sorting)
    threshold keeps, ties included, for odd and even sizes and stacked matrices."""
    from perspective_jax.quant.ternary import magnitude_threshold
    rng = np.random.default_rng(int(fraction * 100) + ties)
    for shape in ((3, 2, 257), (1, 4096), (5, 64)):
        a = np.abs(rng.normal(size=shape)).astype(np.float32)
        if ties:
            a = np.round(a * 4) / 4                  # many equal magnitudes, zeros too
        t = np.asarray(magnitude_threshold(jnp.asarray(a), fraction))
        q = np.asarray(jnp.quantile(jnp.asarray(a), 1.0 - jnp.float32(fraction), axis=-1,
                                    keepdims=True))
        np.testing.assert_array_equal(a >= t, a >= q)
