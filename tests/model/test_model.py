"""Whole-model behaviour: cached decode == parallel forward, remat, params, grads."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perspective_jax.model.cache_io import load_cache, save_cache
from perspective_jax.model.transformer import (PerspectiveLM, init_cache, init_params,
                                               logical_axes)
from perspective_jax.errors import UserError


def tokens_for(cfg, b, t, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.vocab_size)


def decode_in_pieces(model, params, tokens, cache, pieces):
    outs = []
    step = jax.jit(lambda p, x, c: model.apply({"params": p}, x, cache=c))
    for lo, hi in pieces:
        logits, cache = step(params, tokens[:, lo:hi], cache)
        outs.append(logits)
    return jnp.concatenate(outs, axis=1), cache


def test_step_by_step_decode_equals_parallel_forward(small_cfg):
    """T = 29 > window 8 and > several PDR chunks: prefill 5, then 24 single steps."""
    cfg = small_cfg
    params = init_params(cfg, jax.random.key(0))
    model = PerspectiveLM(cfg)
    tokens = tokens_for(cfg, 2, 29)
    full, _ = model.apply({"params": params}, tokens)
    pieces = [(0, 5)] + [(i, i + 1) for i in range(5, 29)]
    dec, cache = decode_in_pieces(model, params, tokens, init_cache(cfg, 2), pieces)
    np.testing.assert_allclose(np.asarray(dec), np.asarray(full), atol=1e-4, rtol=1e-4)
    assert np.asarray(cache["next_pos"]).tolist() == [29, 29]


def test_chunked_prefill_equals_parallel_forward(small_cfg):
    """Several multi-token calls (longer than the window) continue exactly."""
    cfg = small_cfg
    params = init_params(cfg, jax.random.key(0))
    model = PerspectiveLM(cfg)
    tokens = tokens_for(cfg, 1, 40, seed=2)
    full, _ = model.apply({"params": params}, tokens)
    dec, _ = decode_in_pieces(model, params, tokens, init_cache(cfg, 1),
                              [(0, 17), (17, 20), (20, 40)])
    np.testing.assert_allclose(np.asarray(dec), np.asarray(full), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_does_not_change_values_or_grads(small_cfg, remat):
    base = small_cfg
    cfg = dataclasses.replace(base, remat=remat)
    params = init_params(base, jax.random.key(0))
    tokens = tokens_for(base, 2, 16)

    def loss(cfg, p):
        logits, _ = PerspectiveLM(cfg).apply({"params": p}, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    (l0, g0), (l1, g1) = (jax.value_and_grad(lambda p: loss(c, p))(params) for c in (base, cfg))
    np.testing.assert_allclose(float(l0), float(l1), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_gradient_reaches_every_parameter_including_w_p(small_cfg):
    params = init_params(small_cfg, jax.random.key(0))
    tokens = tokens_for(small_cfg, 2, 16)
    model = PerspectiveLM(small_cfg)

    def loss(p):
        logits, _ = model.apply({"params": p}, tokens[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

    grads = jax.grad(loss)(params)
    w_p = grads["periods"]["layer_0"]["mixer"]["w_p"]
    assert float(jnp.abs(w_p).max()) > 0
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)


def test_decays_lie_in_open_unit_interval(small_cfg):
    params = init_params(small_cfg, jax.random.key(0))
    mixer = params["periods"]["layer_0"]["mixer"]
    gamma = jax.nn.sigmoid(mixer["b_p"])
    np.testing.assert_allclose(np.asarray(gamma), small_cfg.pdr_init_decay, rtol=1e-5)
    # RMS-normalised inputs (unit scale): decays strictly inside (0, 1)
    x = jax.random.normal(jax.random.key(3), (1000, small_cfg.d_model))
    p = x @ mixer["w_p"][0] + mixer["b_p"][0]
    decay = jnp.exp(jax.nn.log_sigmoid(p))
    assert float(decay.min()) > 0 and float(decay.max()) < 1
    # extreme inputs: the mixer caps decays at pdr_max_decay < 1 (observed, via sow)
    from perspective_jax.model.pdr import PDRMixer
    x = jax.random.normal(jax.random.key(4), (1, 16, small_cfg.d_model)) * 1e3
    _, state = PDRMixer(small_cfg).apply(
        {"params": jax.tree.map(lambda a: a[0], mixer)}, x, jnp.arange(16)[None],
        mutable=["intermediates"])
    (log_decay,) = state["intermediates"]["log_decay"]
    assert float(jnp.exp(log_decay).max()) <= small_cfg.pdr_max_decay < 1
    assert bool(jnp.isfinite(log_decay).all())  # tiny decays stay finite in log space


def test_params_stack_over_periods_and_carry_logical_axes(small_cfg):
    params = init_params(small_cfg, jax.random.key(0))
    axes = logical_axes(small_cfg)
    w_q = params["periods"]["layer_3"]["mixer"]["w_q"]["kernel"]
    assert w_q.shape == (small_cfg.n_periods, small_cfg.d_model, small_cfg.n_heads,
                         small_cfg.head_dim)
    assert tuple(axes["periods"]["layer_3"]["mixer"]["w_q"]["kernel"]) == (
        "layers", "embed", "heads", "head_dim")
    assert jax.tree.structure(params) == jax.tree.structure(
        axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def test_cache_save_load_round_trip_is_bit_exact_and_continues(small_cfg, tmp_path):
    cfg = small_cfg
    params = init_params(cfg, jax.random.key(0))
    model = PerspectiveLM(cfg)
    tokens = tokens_for(cfg, 2, 24)
    _, cache = model.apply({"params": params}, tokens[:, :12], cache=init_cache(cfg, 2))
    path = str(tmp_path / "conv.safetensors")
    save_cache(cache, path)
    restored = load_cache(path, cfg)
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(restored)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    cont_a, _ = model.apply({"params": params}, tokens[:, 12:], cache=cache)
    cont_b, _ = model.apply({"params": params}, tokens[:, 12:], cache=restored)
    assert np.array_equal(np.asarray(cont_a), np.asarray(cont_b))


def test_cache_for_other_config_is_refused(small_cfg, tmp_path):
    path = str(tmp_path / "c.safetensors")
    save_cache(init_cache(small_cfg, 1), path)
    other = dataclasses.replace(small_cfg, pdr_rank=4)
    with pytest.raises(UserError, match="expects"):
        load_cache(path, other)
    (tmp_path / "junk.safetensors").write_bytes(b"not a cache")
    with pytest.raises(UserError, match="not a readable cache"):
        load_cache(str(tmp_path / "junk.safetensors"), small_cfg)


def test_ten_thousand_decode_steps_of_constant_input_stay_finite(small_cfg):
    """The PDR mixer's decode path, 10k steps of one constant (large) input."""
    from perspective_jax.model.pdr import PDRMixer, init_pdr_cache
    cfg = small_cfg
    mixer = PDRMixer(cfg)
    x = jnp.full((1, 1, cfg.d_model), 3.0)
    params = mixer.init(jax.random.key(0), x, jnp.zeros((1, 1), jnp.int32))["params"]
    params = jax.tree.map(lambda a: getattr(a, "value", a), params,
                          is_leaf=lambda a: hasattr(a, "value"))

    def body(i, carry):
        cache, _ = carry
        y, cache = mixer.apply({"params": params}, x, jnp.full((1, 1), i), cache)
        return cache, y

    cache, y = jax.jit(lambda c: jax.lax.fori_loop(
        0, 10_000, body, (c, jnp.zeros((1, 1, cfg.d_model)))))(init_pdr_cache(cfg, 1))
    state = np.asarray(cache.state)
    assert np.isfinite(state).all() and np.isfinite(np.asarray(y)).all()
    # float64 closed form: S_n = v kᵀ · (1 − γⁿ) / (1 − γ) per row
    xs = np.asarray(x[0, 0], np.float64)
    p = xs @ np.asarray(params["w_p"], np.float64) + np.asarray(params["b_p"], np.float64)
    gamma = np.minimum(1.0 / (1.0 + np.exp(-p)), cfg.pdr_max_decay)
    k = xs @ np.asarray(params["w_k"]["kernel"], np.float64)
    v = xs @ np.asarray(params["w_v"]["kernel"], np.float64)
    expected = np.outer(v * (1 - gamma ** 10_000) / (1 - gamma), k)
    np.testing.assert_allclose(state[0], expected, rtol=2e-2, atol=1e-3)
