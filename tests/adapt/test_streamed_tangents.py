"""Forward-mode derivatives on the streaming engine == those of the in-memory model
(exported expert values): the loss, its directional derivatives along LoRA tangents,
and the loss under moved expert coordinates; LoRA at zero == the base model."""

import jax
import numpy as np
import pytest

from perspective_jax.adapt import coords as C
from perspective_jax.adapt.target import InMemoryTarget, StreamedTarget
from perspective_jax.errors import UserError
from perspective_jax.export.exporter import with_ternary_experts
from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.options import EngineOptions
from perspective_jax.model.extensions import init_lora


def _tangents(lora, k, key):
    leaves, tree = jax.tree.flatten(lora)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [jax.random.normal(s, (k, *a.shape)) for s, a in
                                     zip(keys, leaves)])


@pytest.fixture(scope="module")
def targets(exported):
    cfg, params, path = exported
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1, device_slots=2))
    yield cfg, InMemoryTarget(cfg, with_ternary_experts(jax.tree.map(np.asarray, params),
                                                        cfg)), StreamedTarget(engine)
    engine.close()


def test_streamed_derivatives_equal_in_memory_jvp(targets):
    cfg, mem, streamed = targets
    rng = np.random.default_rng(0)
    windows = rng.integers(0, cfg.model.vocab_size, (3, 11))
    lora = jax.tree.map(lambda a: a + 0.05, init_lora(cfg.model, jax.random.key(1)))
    tangents = _tangents(lora, 5, jax.random.key(2))
    loss_m, d_m = mem.loss_and_derivatives(windows, lora, tangents)
    loss_s, d_s = streamed.loss_and_derivatives(windows, lora, tangents)
    assert d_m.shape == d_s.shape == (5,)
    assert np.abs(d_m).max() > 1e-3                   # the tangents move the loss
    np.testing.assert_allclose(loss_s, loss_m, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_s, d_m, rtol=1e-3, atol=1e-4)
    # and the in-memory ones are the gradient's projections (reverse mode, float64-free)
    grad = jax.grad(lambda a: mem.loss_fn(mem.params, windows, a))(lora)
    ref = [sum(float(np.vdot(g, t[k])) for g, t in zip(jax.tree.leaves(grad),
                                                      jax.tree.leaves(tangents)))
           for k in range(5)]
    np.testing.assert_allclose(d_m, ref, rtol=1e-3, atol=1e-4)


def test_lora_at_zero_is_the_base_model_on_both(targets):
    cfg, mem, streamed = targets
    windows = np.random.default_rng(3).integers(0, cfg.model.vocab_size, (2, 9))
    zero = init_lora(cfg.model, jax.random.key(4))            # B = 0
    for target in (mem, streamed):
        np.testing.assert_allclose(target.view_logits(windows, zero),
                                   target.view_logits(windows, None), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(streamed.view_logits(windows, None),
                               mem.view_logits(windows, None), rtol=1e-4, atol=1e-4)


def test_moved_coordinates_route_alike_in_memory_and_streamed(targets):
    cfg, mem, streamed = targets
    z0 = mem.positions()
    for name, z in streamed.positions().items():
        np.testing.assert_allclose(z, z0[name], atol=1e-6)
    moved = {k: np.mod(v + 0.3, 1.0) for k, v in z0.items()}
    windows = np.random.default_rng(5).integers(0, cfg.model.vocab_size, (2, 9))
    base = mem.loss(windows, None)
    assert abs(mem.loss(windows, None, moved) - base) > 1e-4
    np.testing.assert_allclose(streamed.loss(windows, None, moved),
                               mem.loss(windows, None, moved), rtol=1e-4)
    np.testing.assert_allclose(streamed.loss(windows, None), base, rtol=1e-4)   # restored
    with pytest.raises(UserError, match="shape"):
        C.engine_layer_params(streamed.engine, {k: v[:, :2] for k, v in moved.items()})
