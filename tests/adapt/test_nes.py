"""NES on expert coordinates (SPEC §3.8): centred ranks against a sequential
reference, the update wraps around the torus, the elastic anchor pulls across the
seam the short way, and NES reaches a target on the far side of the seam."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perspective_jax.adapt.nes import NESConfig, centred_ranks, nes_step
from perspective_jax.errors import UserError
from perspective_jax.moe.torus import geodesic_distance_sq


def test_centred_ranks_against_a_loop():
    f = np.random.default_rng(0).normal(size=16)
    f[3] = f[5]                                                    # a tie
    ref = np.empty(16)
    for i, x in enumerate(f):
        ref[i] = (sum(y < x for y in f) + (sum(y == x for y in f) - 1) / 2) / 15 - 0.5
    np.testing.assert_allclose(np.asarray(centred_ranks(jnp.asarray(f))), ref, atol=1e-6)
    assert float(jnp.abs(centred_ranks(jnp.zeros(8))).max()) == 0.0


def test_anchor_pulls_across_the_seam_and_the_result_wraps():
    z, z0 = jnp.asarray([[0.02, 0.5, 0.5]]), jnp.asarray([[0.98, 0.5, 0.5]])
    flat = lambda z: jnp.float32(0.0)                                  # noqa: E731
    cfg = NESConfig(lr=1.0, anchor=1.0, sigma=0.01)
    out = np.asarray(nes_step(flat, z, z0, jax.random.key(0), cfg))
    # constant fitness: tied ranks are all 0, only the anchor moves z:
    # 0.02 − lr·2λ·0.04 = −0.06 → 0.94 (the short way, across the seam)
    assert 0.0 <= out.min() and out.max() < 1.0
    assert out[0, 0] == pytest.approx(0.94, abs=0.02)
    np.testing.assert_allclose(out[0, 1:], [0.5, 0.5], atol=1e-6)


def test_nes_reaches_a_target_across_the_seam():
    target = jnp.asarray([[0.05, 0.9, 0.5]])
    z = z0 = jnp.asarray([[0.85, 0.1, 0.5]])
    fit = lambda z: -jnp.sum(geodesic_distance_sq(z, target))          # noqa: E731
    cfg = NESConfig(population=16, sigma=0.02, lr=0.001, anchor=0.0)
    step = jax.jit(lambda z, k: nes_step(fit, z, z0, k, cfg))
    start = float(-fit(z))
    for k in jax.random.split(jax.random.key(0), 300):
        z = step(z, k)
    assert float(-fit(z)) < 0.05 * start
    assert 0.0 <= float(z.min()) and float(z.max()) < 1.0


def test_bad_config_is_refused():
    for kw in ({"population": 3}, {"sigma": 0.0}, {"lr": 0.0}, {"anchor": -1.0}):
        with pytest.raises(UserError):
            NESConfig(**kw)
