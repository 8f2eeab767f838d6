"""The adaptation loop, in memory (the streamed target's derivatives equal these,
test_streamed_tangents.py; perspective-adapt runs the loop streamed, tests/cli): with
K = dim orthogonal directions the forward gradient is the backprop gradient exactly;
updates lower the loss of what they are fed; NES moves coordinates within the
anchor's reach; a round that goes off the rails is rolled back to the exact adapters,
optimiser state and coordinates, and reported."""

import jax
import numpy as np
import pytest

from perspective_jax.adapt.loop import AdaptConfig, Adaptation
from perspective_jax.adapt.nes import NESConfig
from perspective_jax.adapt.rails import RailsConfig
from perspective_jax.adapt.target import InMemoryTarget
from perspective_jax.errors import UserError
from perspective_jax.export.exporter import with_ternary_experts
from perspective_jax.moe.torus import signed_step


@pytest.fixture(scope="module")
def targets(exported):
    cfg, params, path = exported
    used = with_ternary_experts(jax.tree.map(np.asarray, params), cfg)
    return cfg, InMemoryTarget(cfg, used)


def _windows(cfg, seed, b=2, t=9):
    return np.random.default_rng(seed).integers(0, cfg.model.vocab_size, (b, t))


def test_forward_gradient_with_all_orthogonal_directions_is_the_gradient(targets):
    """(In memory: the streamed derivatives equal these, test_streamed_tangents.py.)
    With A trained too, all of it; with A frozen (the default), B's part, A's zero."""
    cfg, mem = targets
    lora = jax.tree.map(lambda a: a + 0.1, Adaptation(mem, AdaptConfig(rank=1)).lora)
    windows = _windows(cfg, 1, b=1, t=6)
    ref = jax.grad(lambda a: mem.loss_fn(mem.params, windows, a))(lora)
    for adapt_a in (True, False):
        probe = Adaptation(mem, AdaptConfig(rank=1, adapt_a=adapt_a), lora=lora)
        run = Adaptation(mem, AdaptConfig(rank=1, directions=probe.dim, adapt_a=adapt_a,
                                          estimator="orthogonal"), lora=lora)
        loss, g = run.gradient(windows)
        np.testing.assert_allclose(loss, mem.loss(windows, lora), rtol=1e-5)
        flat_g = jax.tree_util.tree_flatten_with_path(g)[0]
        for (path, a), b in zip(flat_g, jax.tree.leaves(ref)):
            want = b if adapt_a or path[-1].key == "b" else np.zeros_like(b)
            np.testing.assert_allclose(a, want, rtol=2e-3, atol=2e-5)


def test_updates_lower_the_loss_they_are_fed_and_nes_stays_anchored(targets):
    cfg, mem = targets
    windows = _windows(cfg, 2, b=4, t=12)
    nes = NESConfig(population=8, sigma=0.02, lr=0.002, anchor=0.1)
    run = Adaptation(mem, AdaptConfig(directions=16, lr=1e-2, nes=nes))
    before = mem.loss(windows, run.lora, run.coords)
    for _ in range(30):
        run.step(windows)
    after = mem.loss(windows, run.lora, run.coords)
    assert after < before - 0.05
    moved = max(np.abs(signed_step(run.trained[k], run.coords[k])).max() for k in run.coords)
    assert 0 < moved < 30 * 0.3 * nes.lr / nes.sigma + 1e-6        # bounded per update
    assert run.updates == 30 and run.update_s > 0


def test_a_round_off_the_rails_is_rolled_back_exactly(targets):
    cfg, mem = targets
    train, held = _windows(cfg, 3, b=3), _windows(cfg, 4, b=3)
    good = Adaptation(mem, AdaptConfig(directions=8, lr=1e-3))
    rails = good.rails(held)
    assert 0 <= rails.baseline_agreement <= 1
    report = good.round([train], held, rails)
    assert report["rolled_back"] is None and good.rollbacks == []
    bad = Adaptation(mem, AdaptConfig(directions=8, optimizer="sgd", lr=9.0,
                                      rails=RailsConfig(max_loss_rise=0.01)),
                     lora=good.lora)
    rails = bad.rails(held)
    saved = jax.tree.map(np.array, bad.state())
    report = bad.round([train] * 3, held, rails)
    assert report["rolled_back"] and "loss" in report["rolled_back"]
    for a, b in zip(jax.tree.leaves(bad.state()), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert bad.target.loss(held, bad.lora) == pytest.approx(rails.baseline_loss, rel=1e-6)


def test_the_cosine_schedule_ends_at_a_tenth():
    from perspective_jax.adapt.loop import optimizer
    import jax.numpy as jnp
    opt = optimizer(AdaptConfig(optimizer="sgd", lr=0.5, decay_steps=10))
    params = {"w": jnp.zeros(())}
    state = opt.init(params)
    steps = []
    for _ in range(12):
        upd, state = opt.update({"w": jnp.ones(())}, state, params)
        steps.append(-float(upd["w"]))
    np.testing.assert_allclose(steps[0], 0.5, rtol=1e-6)
    np.testing.assert_allclose(steps[10:], 0.05, rtol=1e-5)
    assert all(a >= b for a, b in zip(steps, steps[1:]))


def test_bad_settings_are_one_line_errors():
    for kw, word in (({"estimator": "fancy"}, "estimator"), ({"optimizer": "lbfgs"},
                     "optimizer"), ({"directions": 0}, "directions"),
                     ({"estimator": "antithetic", "directions": 3}, "pairs"),
                     ({"lr": 0.0}, "lr"), ({"decay_steps": -1}, "decay_steps")):
        with pytest.raises(UserError, match=word):
            AdaptConfig(**kw)
