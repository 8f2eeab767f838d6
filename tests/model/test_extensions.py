"""Block parts and extension points of the model (routing policy, final transform,
residual injection, LoRA adapters), each checked against a second computation:
the parts composed by hand, merged weights, a manual injection, a fixed gate."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perspective_jax.config import ModelConfig, MoEConfig
from perspective_jax.config.choices import ROUTE_MODES
from perspective_jax.errors import UserError
from perspective_jax.model.extensions import Extensions, RoutePolicy, init_lora, layer_adapters
from perspective_jax.model.routed_ffn import RoutedFFN, gated_residual
from perspective_jax.model.transformer import PerspectiveLM, ResidualBlock, init_cache, init_params
from perspective_jax.moe.dispatch import dispatch_dense

MOE = MoEConfig(num_experts=8, lattice=(2, 2, 2))


def _cfg(routed=True) -> ModelConfig:
    return ModelConfig(vocab_size=64, d_model=32, n_layers=8, d_ff=48, pdr_rank=8, pdr_chunk=4,
                       n_heads=4, n_kv_heads=2, head_dim=8, window=8, routed=routed)


@pytest.fixture(scope="module")
def routed():
    cfg = _cfg()
    params = init_params(cfg, jax.random.key(0), moe=MOE)
    tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, cfg.vocab_size)
    return cfg, params, tokens


def _logits(cfg, params, tokens, ext=None, cache=None):
    return PerspectiveLM(cfg, MOE).apply({"params": params}, tokens, cache=cache, ext=ext)


def _by_parts(cfg, params, tokens, ext=None, inject=None):
    """The forward pass layer by layer through ResidualBlock's parts, experts computed
    by the dense reference dispatch — how the streaming engine composes a block."""
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    x = params["embed"]["embedding"][tokens] * np.sqrt(cfg.d_model)
    policy = ext.route if ext is not None else RoutePolicy()
    for p in range(cfg.n_periods):
        for i, kind in enumerate(cfg.layer_pattern):
            lp = jax.tree.map(lambda a: a[p], params["periods"][f"layer_{i}"])
            block = ResidualBlock(cfg, kind, MOE, policy=policy, layer=i)
            h, _ = block.apply({"params": lp}, x, pos, None, p, layer_adapters(ext, p, i),
                               part="mix")
            if block.routed:
                hn, idx, gate, _ = block.apply({"params": lp}, h, pos, None, p, part="route")
                f = lp["ffn"]
                y = dispatch_dense(hn.reshape(b * t, -1), idx.reshape(-1), f["w_gate"],
                                   f["w_up"], f["w_down"])
                x = gated_residual(h, y, gate)
            else:
                x = block.apply({"params": lp}, h, pos, part="ffn")
            if inject is not None and inject[0] == p * len(cfg.layer_pattern) + i:
                x = x + inject[1]
    from perspective_jax.model.layers import RMSNorm
    xn = RMSNorm(cfg).apply({"params": params["final_norm"]}, x).astype(jnp.float32)
    if ext is not None and ext.final_transform is not None:
        xn, _ = ext.final_transform(xn, ext.final_state)
    return xn @ params["embed"]["embedding"].T


@pytest.mark.parametrize("mode", ROUTE_MODES)
def test_parts_compose_to_the_model_in_every_route_mode(routed, mode):
    cfg, params, tokens = routed
    ext = Extensions(route=RoutePolicy(mode, k=1, seed=3))
    want, _ = _logits(cfg, params, tokens, ext)
    got = _by_parts(cfg, params, tokens, ext)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_dense_model_parts_compose_to_the_model():
    cfg = _cfg(routed=False)
    params = init_params(cfg, jax.random.key(2))
    tokens = jax.random.randint(jax.random.key(3), (1, 9), 0, cfg.vocab_size)
    want, _ = PerspectiveLM(cfg).apply({"params": params}, tokens)
    got = _by_parts(cfg, params, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mode", ROUTE_MODES)
def test_straight_through_gate_is_one_even_where_the_softmax_underflows(routed, mode):
    """τ = 0.005: the chosen expert's softmax weight underflows to 0 for far experts
    (antipode, random); g / g gave NaN there, exp(ℓ − sg(ℓ)) is exactly 1."""
    cfg, params, tokens = routed
    moe = dataclasses.replace(MOE, router_temperature=0.005, learn_temperature=False)
    x = jax.random.normal(jax.random.key(4), (4, 16, cfg.d_model))
    ffn = RoutedFFN(cfg, moe, RoutePolicy(mode, k=7, seed=1))
    fp = ffn.init(jax.random.key(5), x)["params"]
    fp = jax.tree.map(lambda a: getattr(a, "value", a), fp, is_leaf=lambda a: hasattr(a, "value"))
    idx, gate, _ = ffn.apply({"params": fp}, x, route_only=True)
    assert np.array_equal(np.asarray(gate), np.ones(gate.shape, np.float32))
    y = ffn.apply({"params": fp}, x)[0]
    ref = dispatch_dense(x.reshape(-1, cfg.d_model), idx.reshape(-1), fp["w_gate"], fp["w_up"],
                         fp["w_down"])
    np.testing.assert_allclose(np.asarray(y).reshape(ref.shape), np.asarray(ref), atol=1e-5)
    grads = jax.grad(lambda p: jnp.sum(ffn.apply({"params": p}, x)[0] ** 2))(fp)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    lm = dataclasses.replace(moe)
    logits, _ = PerspectiveLM(cfg, lm).apply({"params": params}, tokens,
                                             ext=Extensions(route=RoutePolicy(mode, k=7, seed=1)))
    assert bool(jnp.isfinite(logits).all())


def test_policies_change_routing_and_random_is_seeded_per_position(routed):
    cfg, params, tokens = routed
    base, _ = _logits(cfg, params, tokens)
    for mode in ("kth", "antipode", "random"):
        other, _ = _logits(cfg, params, tokens, Extensions(route=RoutePolicy(mode, k=1)))
        assert not np.allclose(np.asarray(other), np.asarray(base)), mode
    kth0, _ = _logits(cfg, params, tokens, Extensions(route=RoutePolicy("kth", k=0)))
    assert np.array_equal(np.asarray(kth0), np.asarray(base))
    ext = Extensions(route=RoutePolicy("random", seed=7))
    full, _ = _logits(cfg, params, tokens, ext)
    cache, steps = init_cache(cfg, 2), []
    for s in range(tokens.shape[1]):                  # token by token: same draws
        out, cache = _logits(cfg, params, tokens[:, s:s + 1], ext, cache)
        steps.append(out)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full),
                               atol=2e-5, rtol=2e-5)
    seed8, _ = _logits(cfg, params, tokens, Extensions(route=RoutePolicy("random", seed=8)))
    assert not np.allclose(np.asarray(seed8), np.asarray(full))
    with pytest.raises(UserError, match="route mode"):
        RoutePolicy("farthest")


def test_row_routes_route_each_row_by_its_own_policy(routed):
    """RowRoutes (MPD's perspectives as one batch): row b·n + k of a tiled batch
    equals the whole batch run under policies[k] alone — in a parallel pass."""
    from perspective_jax.model.extensions import RowRoutes
    cfg, params, tokens = routed
    policies = (RoutePolicy(), RoutePolicy("kth", k=1), RoutePolicy("antipode"),
                RoutePolicy("random", seed=3))
    n = len(policies)
    rows, _ = _logits(cfg, params, jnp.repeat(tokens, n, axis=0),
                      Extensions(route=RowRoutes(policies)))
    for k, policy in enumerate(policies):
        alone, _ = _logits(cfg, params, tokens, Extensions(route=policy))
        np.testing.assert_allclose(np.asarray(rows[k::n]), np.asarray(alone),
                                   atol=2e-5, rtol=2e-5)
    with pytest.raises(UserError, match="RowRoutes"):
        RowRoutes(())


def test_neutral_extensions_are_bit_identical(routed):
    cfg, params, tokens = routed
    base, _ = _logits(cfg, params, tokens)
    neutral = [Extensions(), Extensions(route=RoutePolicy("nearest")),
               Extensions(final_transform=lambda xn, _: (xn, {})),
               Extensions(inject_layer=5, inject=jnp.zeros((cfg.d_model,))),
               Extensions(adapters=init_lora(cfg, jax.random.key(9)))]
    for ext in neutral:
        got, _ = _logits(cfg, params, tokens, ext)
        assert np.array_equal(np.asarray(got), np.asarray(base)), ext


def test_final_transform_and_injection_match_a_manual_computation(routed):
    cfg, params, tokens = routed
    vec = jax.random.normal(jax.random.key(10), (2, cfg.d_model))
    for layer in (0, 3, 6):
        ext = Extensions(inject_layer=layer, inject=vec, final_transform=lambda xn, _: (0.5 * xn, {}))
        got, _ = _logits(cfg, params, tokens, ext)
        want = _by_parts(cfg, params, tokens, ext, inject=(layer, vec[:, None, :]))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=3e-5, rtol=3e-5)
    with pytest.raises(UserError, match="needs both"):
        Extensions(inject_layer=2)


def test_lora_on_w_p_equals_merged_weights(routed):
    cfg, params, tokens = routed
    lora = init_lora(cfg, jax.random.key(11), rank=4)
    lora = jax.tree.map(lambda a: a, lora)
    for name, layer in lora["periods"].items():
        layer["w_p"]["b"] = 0.3 * jax.random.normal(jax.random.key(12), layer["w_p"]["b"].shape)
    ext = Extensions(adapters=lora, adapter_scale=2.0)
    got, _ = _logits(cfg, params, tokens, ext)
    merged = jax.tree.map(lambda a: a, params)
    for name, layer in lora["periods"].items():
        w = merged["periods"][name]["mixer"]["w_p"]
        merged["periods"][name]["mixer"]["w_p"] = w + 2.0 * jnp.einsum(
            "pir,pro->pio", layer["w_p"]["a"], layer["w_p"]["b"])
    want, _ = _logits(cfg, merged, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4, rtol=2e-4)
    assert not np.allclose(np.asarray(got), np.asarray(_logits(cfg, params, tokens)[0]))


def test_an_injection_layer_outside_the_model_is_a_one_line_error():
    from perspective_jax.model.extensions import check_extensions
    cfg = _cfg()
    check_extensions(Extensions(inject_layer=7, inject=jnp.zeros((cfg.d_model,))), cfg)
    with pytest.raises(UserError, match="inject_layer 8: the model has layers 0..7"):
        check_extensions(Extensions(inject_layer=8, inject=jnp.zeros((cfg.d_model,))), cfg)
