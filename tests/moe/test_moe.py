"""Dispatch == dense reference (values and grads), router behaviour, losses, upcycling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perspective_jax.config import MoEConfig
from perspective_jax.moe.dispatch import IMPLS, dispatch_dense, expert_swiglu
from perspective_jax.moe.metrics import gini, routing_report
from perspective_jax.model.expert_sharing import delta_loss
from perspective_jax.model.routed_ffn import RoutedFFN, TorusRouter, select_expert


def expert_weights(e, d, f, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (e, d, f)) / d ** 0.5,
            jax.random.normal(keys[1], (e, d, f)) / d ** 0.5,
            jax.random.normal(keys[2], (e, f, d)) / f ** 0.5)


@pytest.mark.parametrize("n,block", [(100, 8), (37, 64), (1, 64), (64, 1)])
def test_dispatch_implementations_match_dense_reference(n, block):
    e, d, f = 6, 16, 24
    x = jax.random.normal(jax.random.key(1), (n, d))
    idx = jax.random.randint(jax.random.key(2), (n,), 0, e - 1)   # expert e−1 stays empty
    w = expert_weights(e, d, f)
    ref = np.asarray(dispatch_dense(x, idx, *w))

    def loss(impl, x, *w):
        return jnp.sum(jnp.sin(expert_swiglu(x, idx, *w, impl=impl, block=block)))

    ref_grads = jax.grad(lambda *a: loss("dense", *a), argnums=(0, 1, 2, 3))(x, *w)
    for impl in IMPLS:
        out = np.asarray(expert_swiglu(x, idx, *w, impl=impl, block=block))
        np.testing.assert_allclose(out, ref, atol=2e-5, err_msg=impl)
        grads = jax.grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2, 3))(x, *w)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5, err_msg=impl)


def test_dispatch_is_dropless_under_total_imbalance():
    e, d, f, n = 4, 8, 8, 50
    x = jax.random.normal(jax.random.key(3), (n, d))
    idx = jnp.full((n,), 2)
    w = expert_weights(e, d, f)
    np.testing.assert_allclose(np.asarray(expert_swiglu(x, idx, *w, impl="blocked", block=16)),
                               np.asarray(dispatch_dense(x, idx, *w)), atol=1e-5)


def router_setup(small_cfg, moe=MoEConfig()):
    router = TorusRouter(small_cfg, moe)
    h = jax.random.normal(jax.random.key(4), (4, 64, small_cfg.d_model))
    params = router.init(jax.random.key(5), h)["params"]
    params = jax.tree.map(lambda a: getattr(a, "value", a), params,
                          is_leaf=lambda a: hasattr(a, "value"))
    return router, params, h


def test_routing_is_deterministic_and_reaches_every_expert(small_cfg):
    router, params, h = router_setup(small_cfg)
    idx1, *_ = router.apply({"params": params}, h)
    idx2, *_ = router.apply({"params": params}, h)
    assert np.array_equal(np.asarray(idx1), np.asarray(idx2))
    assert set(np.asarray(idx1).ravel().tolist()) == set(range(8))


def test_router_modes(small_cfg):
    d2 = jnp.array([[0.5, 0.1, 0.3, 0.9]])
    assert int(select_expert(d2, "nearest")[0]) == 1
    assert int(select_expert(d2, "kth", k=1)[0]) == 2
    r = select_expert(jnp.zeros((1000, 4)), "random", key=jax.random.key(0))
    assert set(np.asarray(r).tolist()) == {0, 1, 2, 3}
    pos = jnp.array([[0.0, 0, 0], [0.5, 0.5, 0.5]])
    z = jnp.array([[0.05, 0.0, 0.02]])
    assert int(select_expert(jnp.zeros((1, 2)), "antipode", z=z, pos=pos)[0]) == 1


@pytest.mark.parametrize("gate", ["straight_through", "softmax"])
def test_gradient_reaches_router_and_offsets(small_cfg, gate):
    moe = MoEConfig(gate=gate)
    layer = RoutedFFN(small_cfg, moe)
    x = jax.random.normal(jax.random.key(6), (2, 16, small_cfg.d_model))
    params = layer.init(jax.random.key(7), x)["params"]
    params = jax.tree.map(lambda a: getattr(a, "value", a), params,
                          is_leaf=lambda a: hasattr(a, "value"))
    grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x)[0] ** 2))(params)
    for name in ("w_route", "offsets", "log_temperature"):
        assert float(jnp.abs(grads["router"][name]).max()) > 0, name


def test_straight_through_gate_has_value_one(small_cfg):
    moe = MoEConfig()
    layer = RoutedFFN(small_cfg, moe)
    x = jax.random.normal(jax.random.key(8), (2, 8, small_cfg.d_model))
    params = layer.init(jax.random.key(9), x)["params"]
    params = jax.tree.map(lambda a: getattr(a, "value", a), params,
                          is_leaf=lambda a: hasattr(a, "value"))
    y = layer.apply({"params": params}, x)[0]
    idx, *_ = TorusRouter(small_cfg, moe).apply({"params": params["router"]}, x)
    ref = dispatch_dense(x.reshape(-1, small_cfg.d_model), idx.reshape(-1), params["w_gate"],
                         params["w_up"], params["w_down"])
    np.testing.assert_allclose(np.asarray(y).reshape(ref.shape), np.asarray(ref), atol=1e-5)


def test_losses_and_metrics_reference_values(small_cfg):
    assert gini([1, 1, 1, 1]) == pytest.approx(0.0)
    assert gini([0, 0, 0, 4]) == pytest.approx(0.75)
    rep = routing_report([[5, 5, 5, 5]], [6, 3, 1])
    assert rep["gini"] == 0 and rep["all_reachable"] and rep["switch_same"] == 0.6
    assert rep["utilisation_entropy"] == pytest.approx(1.0)
    # delta loss: zero for identical experts, positive otherwise
    cfg = dataclasses.replace(small_cfg, routed=True)
    from perspective_jax.model.transformer import init_params
    params = init_params(cfg, jax.random.key(0))
    assert float(delta_loss(params, cfg, MoEConfig())) > 0
    same = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.broadcast_to(a[:, :1], a.shape)
        if any(getattr(k, "key", None) in ("w_gate", "w_up", "w_down") for k in p) else a,
        params)
    assert float(delta_loss(same, cfg, MoEConfig())) == 0.0
