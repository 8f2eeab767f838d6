"""The delta loss's two forms and the locality loss against float64 numpy references:
the ternary form is the mean neighbour trit difference and its gradient moves only
weights whose trits differ; the locality loss is −log of the router mass on the
previous token's lattice neighbourhood."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perspective_jax.config import MoEConfig
from perspective_jax.config.param_layout import routed_positions
from perspective_jax.errors import ConfigError
from perspective_jax.model.expert_sharing import abs_zero_grad, delta_loss, ste_codes
from perspective_jax.model.routed_ffn import locality_loss
from perspective_jax.model.transformer import init_params

LATTICE = (2, 2, 2)


def np_pairs(lattice):
    cells = list(itertools.product(*[range(n) for n in lattice]))
    return [(a, b) for a, b in itertools.combinations(range(len(cells)), 2)
            if sum(ca != cb for ca, cb in zip(cells[a], cells[b])) == 1]


def np_trits(w, granularity):
    w = np.asarray(w, np.float64)
    axes = (-2, -1) if granularity == "tensor" else (-2,)
    s = np.abs(w).mean(axis=axes, keepdims=True)
    return np.clip(np.round(w / (s + 1e-8)), -1, 1)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_ternary_delta_loss_is_mean_neighbour_trit_difference(small_cfg, granularity):
    cfg = dataclasses.replace(small_cfg, routed=True)
    moe = MoEConfig(lattice=LATTICE, delta_form="ternary")
    params = init_params(cfg, jax.random.key(0), moe=moe)
    got = float(delta_loss(params, cfg, moe, granularity))
    vals = []
    for i in routed_positions(cfg):
        ffn = params["periods"][f"layer_{i}"]["ffn"]
        for name in ("w_gate", "w_up", "w_down"):
            t = np_trits(ffn[name], granularity)                       # [P, E, K, N]
            vals.append(np.mean([np.abs(t[:, a] - t[:, b]).mean()
                                 for a, b in np_pairs(LATTICE)]))
    np.testing.assert_allclose(got, np.mean(vals), rtol=1e-5)
    assert 0.3 < got < 1.5          # independent random experts: most trits differ


def test_ternary_delta_gradient_moves_only_differing_trits():
    w = jax.random.normal(jax.random.key(1), (2, 16, 8))
    trits = np_trits(w, "tensor")

    def loss(w):
        c = ste_codes(w)
        return abs_zero_grad(c[0] - c[1]).mean()
    g = np.asarray(jax.grad(loss)(w))
    differ = trits[0] != trits[1]
    assert differ.any() and (~differ).any()
    np.testing.assert_array_equal(g[0][~differ], 0.0)
    s0 = np.abs(np.asarray(w[0], np.float64)).mean()
    # d|c0 − c1| / dw0 = sign(t0 − t1) / s0 / (K·N)
    np.testing.assert_allclose(g[0][differ], (np.sign(trits[0] - trits[1]) / s0
                                              / differ.size)[differ], rtol=1e-4)


def test_float_delta_loss_is_unchanged_by_the_form_field(small_cfg):
    cfg = dataclasses.replace(small_cfg, routed=True)
    moe = MoEConfig(lattice=LATTICE, delta_form="float")
    params = init_params(cfg, jax.random.key(0), moe=moe)
    i = routed_positions(cfg)[0]
    w = np.asarray(params["periods"][f"layer_{i}"]["ffn"]["w_up"], np.float64)
    one = np.mean([np.abs(w[:, a] - w[:, b]).mean() for a, b in np_pairs(LATTICE)])
    assert float(delta_loss(params, cfg, moe)) > 0
    assert abs(float(delta_loss(params, cfg, moe)) - one) < 0.5 * one


def test_locality_loss_against_numpy():
    from perspective_jax.moe import torus
    rng = np.random.default_rng(0)
    b, t, e = 3, 9, 8
    logits = rng.normal(size=(b, t, e)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    idx = rng.integers(0, e, (b, t))
    adj = torus.neighbour_matrix(LATTICE)
    want = []
    for r in range(b):
        for s in range(t - 1):
            near = [x for x in range(e) if x == idx[r, s] or adj[idx[r, s], x]]
            want.append(-np.log(probs[r, s + 1, near].sum()))
    got = float(locality_loss(jnp.asarray(idx), jnp.asarray(probs, jnp.float32), adj))
    np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)
    assert float(locality_loss(jnp.asarray(idx[:, :1]), jnp.asarray(probs[:, :1]), adj)) == 0


@pytest.mark.parametrize("field,value", [("delta_form", "l2"), ("locality_weight", -1.0),
                                         ("align_consensus", 0.7)])
def test_sharing_fields_validated(field, value):
    with pytest.raises(ConfigError, match=field):
        MoEConfig(**{field: value})
