"""Forward gradients (SPEC §3.8): unbiased — their mean over many directions is the
backprop gradient, on a quadratic and on LoRA adapters of a small PerspectiveLM —
and the variance of the orthogonal and antithetic variants against the plain one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from perspective_jax.adapt.forward_grad import directions, forward_gradient, guided_directions
from perspective_jax.errors import UserError
from perspective_jax.model.extensions import Extensions, init_lora
from perspective_jax.model.transformer import PerspectiveLM, init_params


def _quadratic(dim=12, seed=0):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(dim, dim)).astype(np.float32)
    a, b = jnp.asarray(m @ m.T / dim + np.eye(dim, dtype=np.float32)), rng.normal(size=dim)
    params = {"x": jnp.asarray(rng.normal(size=dim - 4), jnp.float32),
              "y": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)}

    def loss(p):
        x = jnp.concatenate([p["x"], p["y"].reshape(-1)])
        return 0.5 * x @ a @ x + jnp.asarray(b, jnp.float32) @ x
    return loss, params


def _mean_estimate(loss, params, n_keys, k, **kw):
    est = jax.jit(lambda key: forward_gradient(loss, params, key, k, **kw)[0])
    keys = jax.random.split(jax.random.key(7), n_keys)
    return jax.tree.map(lambda *g: np.mean(np.stack(g), 0), *[est(kk) for kk in keys])


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_mean_of_forward_gradients_is_the_gradient_on_a_quadratic():
    loss, params = _quadratic()
    true = _flat(jax.grad(loss)(params))
    mean = _flat(_mean_estimate(loss, params, 40, 500))          # 20,000 directions
    assert np.linalg.norm(mean - true) / np.linalg.norm(true) < 0.08
    g_hat, value = forward_gradient(loss, params, jax.random.key(0), 8)
    assert float(value) == pytest.approx(float(loss(params)), rel=1e-6)
    assert jax.tree.structure(g_hat) == jax.tree.structure(params)


@pytest.mark.slow
def test_mean_forward_gradient_of_lora_adapters_is_backprops(small_cfg):
    """LoRA on W_p of a small model, B = 0 (where adaptation starts): the mean over
    4,096 directions has a projection on the backprop gradient within ±10 % of its
    norm² (expected spread ±2 %) and points the same way (cos > 0.6 expected ≈ 0.85
    at dim 1,536: 1/√(1 + dim/4096))."""
    model = PerspectiveLM(small_cfg)
    params = init_params(small_cfg, jax.random.key(0))
    lora = init_lora(small_cfg, jax.random.key(1), rank=4)
    tokens = jax.random.randint(jax.random.key(2), (2, 17), 0, small_cfg.vocab_size)

    def loss(adapters):
        logits, _ = model.apply({"params": params}, tokens[:, :-1],
                                ext=Extensions(adapters=adapters))
        lp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], -1))
    true = _flat(jax.grad(loss)(lora))
    mean = _flat(_mean_estimate(loss, lora, 16, 256))
    assert np.linalg.norm(true) > 0
    proj = mean @ true / (true @ true)
    cos = mean @ true / np.linalg.norm(mean) / np.linalg.norm(true)
    assert 0.9 < proj < 1.1 and cos > 0.6, (proj, cos)


def test_orthogonal_directions_lower_the_variance_and_antithetic_pairs_do_not():
    loss, params = _quadratic(dim=64, seed=1)
    true = _flat(jax.grad(loss)(params))

    def mse(**kw):
        est = jax.jit(lambda key: ravel_pytree(forward_gradient(loss, params, key, 32,
                                                                **kw)[0])[0])
        errs = [np.sum((est(k) - true) ** 2)
                for k in jax.random.split(jax.random.key(3), 300)]
        return np.mean(errs) / np.sum(true ** 2)
    plain, orth, anti = mse(), mse(orthogonal=True), mse(antithetic=True)
    # expected ≈ (64 + 1)/32 = 2.0, (64 − 32)/32 = 1.0, and 2 × plain (16 directions)
    assert orth < 0.7 * plain, (plain, orth)
    assert anti > 1.5 * plain, (plain, anti)


def test_orthogonal_directions_span_and_bad_counts_are_refused():
    v = np.asarray(directions(jax.random.key(0), 8, 8, orthogonal=True))
    np.testing.assert_allclose(v @ v.T, 8 * np.eye(8), atol=1e-4)
    with pytest.raises(UserError):
        directions(jax.random.key(0), 3, 8, antithetic=True)
    with pytest.raises(UserError):
        directions(jax.random.key(0), 9, 8, orthogonal=True)


def test_guided_forward_gradient_is_unbiased_exact_in_its_span_and_lower_variance():
    rng = np.random.default_rng(3)
    dim, k = 40, 8
    g = rng.normal(size=dim).astype(np.float32)
    guides = np.stack([g + 0.3 * rng.normal(size=dim), rng.normal(size=dim),
                       np.zeros(dim)]).astype(np.float32)       # a zero guide is dropped
    est = jax.jit(lambda key: (lambda v, w: jnp.sum((w * (v @ g))[:, None] * v, 0))(
        *guided_directions(key, k, jnp.asarray(guides))))
    draws = np.stack([est(kk) for kk in jax.random.split(jax.random.key(1), 4000)])
    np.testing.assert_allclose(draws.mean(0), g, atol=0.12 * np.abs(g).max())
    q, _ = np.linalg.qr(guides[:2].T)                            # the span: exact
    np.testing.assert_allclose(draws @ q, np.broadcast_to(g @ q, (len(draws), 2)),
                               rtol=1e-3, atol=1e-3)
    v, _ = guided_directions(jax.random.key(2), k, jnp.asarray(guides))
    np.testing.assert_allclose(np.asarray(v[3:]) @ q, 0, atol=1e-4)   # randoms ⟂ span
    plain = jax.jit(lambda key: (lambda v: (v @ g)[:, None] * v)(
        directions(key, k, dim)).mean(0))
    plain_draws = np.stack([plain(kk) for kk in jax.random.split(jax.random.key(3), 2000)])
    err = lambda d: np.mean(np.sum((d - g) ** 2, -1))
    assert err(draws) < 0.6 * err(plain_draws)
    with pytest.raises(UserError, match="guides"):
        guided_directions(jax.random.key(0), 3, jnp.asarray(guides))
