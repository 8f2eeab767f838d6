"""The router's context average (moe.route_smoothing): a float64 sequential loop is
the reference; a window equals its pieces fed with the carried state; cached decode
equals the parallel forward; a high λ keeps adjacent tokens' experts near."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perspective_jax.config import MoEConfig
from perspective_jax.errors import ConfigError
from perspective_jax.model.routed_ffn import context_average
from perspective_jax.model.transformer import PerspectiveLM, init_cache, init_params


def loop_reference(u, segment_pos, state, decay):
    """p_t = a_t p_{t-1} + u_t, c_t = a_t c_{t-1} + 1, a_t = λ·[pos_t > 0], float64."""
    u = np.asarray(u, np.float64)
    b, t, _ = u.shape
    out = np.zeros_like(u)
    final = np.zeros((b, 4))
    for r in range(b):
        p, c = (np.zeros(3), 0.0) if state is None else (np.asarray(state[r, :3], np.float64),
                                                        float(state[r, 3]))
        for k in range(t):
            a = decay if segment_pos[r, k] > 0 else 0.0
            p, c = a * p + u[r, k], a * c + 1.0
            out[r, k] = p / c
        final[r] = [*p, c]
    return out, final


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.95])
def test_context_average_equals_a_sequential_float64_loop(decay):
    rng = np.random.default_rng(0)
    u = rng.normal(size=(3, 37, 3)).astype(np.float32)
    pos = np.stack([np.arange(37), np.arange(5, 42), np.r_[np.arange(20), np.arange(17)]])
    state = np.concatenate([rng.normal(size=(3, 3)), rng.uniform(1, 5, (3, 1))], 1)
    state = state.astype(np.float32)
    got, final = context_average(jnp.asarray(u), jnp.asarray(pos), jnp.asarray(state), decay)
    ref, ref_final = loop_reference(u, pos, state, decay)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(final), ref_final, rtol=1e-5, atol=1e-5)
    if decay:              # row 1 never restarts: the carried state reaches every token
        assert not np.allclose(np.asarray(got)[1], np.asarray(u)[1], atol=1e-3)


def test_a_window_equals_its_pieces_fed_with_the_carried_state():
    rng = np.random.default_rng(1)
    u = jnp.asarray(rng.normal(size=(2, 30, 3)).astype(np.float32))
    pos = jnp.broadcast_to(jnp.arange(30), (2, 30))
    whole, final = context_average(u, pos, None, 0.9)
    pieces, state = [], None
    for lo, hi in ((0, 7), (7, 8), (8, 21), (21, 30)):
        part, state = context_average(u[:, lo:hi], pos[:, lo:hi], state, 0.9)
        pieces.append(part)
    np.testing.assert_allclose(np.concatenate(pieces, 1), whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state, final, rtol=1e-5, atol=1e-6)


def routed(small_cfg, decay):
    return (dataclasses.replace(small_cfg, routed=True),
            MoEConfig(route_smoothing=decay, router_temperature=0.3))


def test_cached_decode_equals_the_parallel_forward_with_smoothed_routing(small_cfg):
    cfg, moe = routed(small_cfg, 0.9)
    params = init_params(cfg, jax.random.key(0), moe=moe)
    model = PerspectiveLM(cfg, moe)
    tokens = jax.random.randint(jax.random.key(1), (2, 23), 0, cfg.vocab_size)
    full, _ = model.apply({"params": params}, tokens)
    step = jax.jit(lambda p, x, c: model.apply({"params": p}, x, cache=c))
    cache, outs = init_cache(cfg, 2), []
    for lo, hi in [(0, 6)] + [(i, i + 1) for i in range(6, 23)]:
        logits, cache = step(params, tokens[:, lo:hi], cache)
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-4, rtol=1e-4)
    route = np.asarray(cache["periods"]["layer_0"].route)        # [P, B, 4]
    np.testing.assert_allclose(route[..., 3], (1 - 0.9 ** 23) / (1 - 0.9), rtol=1e-5)


def switch_shares(small_cfg, decay):
    """(same, neighbour, other) shares of adjacent-token switches of a random routed
    model with the router's context average at λ = decay; routes spread over ~2 turns."""
    cfg, moe = routed(small_cfg, decay)
    moe = dataclasses.replace(moe, route_init_scale=2.0)
    params = init_params(cfg, jax.random.key(0), moe=moe)
    tokens = jax.random.randint(jax.random.key(2), (4, 64), 0, cfg.vocab_size)
    _, state = PerspectiveLM(cfg, moe).apply({"params": params}, tokens, mutable=["aux"])
    switches = sum(np.asarray(s).sum(0) for s in
                   jax.tree.leaves(jax.tree_util.tree_map_with_path(
                       lambda p, a: a if "switches" in jax.tree_util.keystr(p) else None,
                       state["aux"])))
    return switches / switches.sum()


def test_a_high_decay_keeps_adjacent_tokens_on_the_same_or_a_neighbouring_expert(small_cfg):
    plain, smooth = switch_shares(small_cfg, 0.0), switch_shares(small_cfg, 0.95)
    assert smooth[2] < 0.5 * plain[2]             # far switches at least halved
    assert smooth[0] + smooth[1] > 0.8


def test_decay_out_of_range_is_refused():
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ConfigError, match="route_smoothing"):
            MoEConfig(route_smoothing=bad)

