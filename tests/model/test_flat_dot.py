"""`layers.flat_dot` (every projection's one matmul) against `jnp.tensordot` in
float64: values and gradients, for 1-3 contracted axes and 0-2 leading axes; and a
model's logits and gradients unchanged whether its projections flatten or not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perspective_jax.model.layers import flat_dot


@pytest.mark.parametrize("lead,in_shape,out_shape", [
    ((), (5,), (3,)), ((7,), (5,), (3,)), ((2, 7), (5,), (3,)),
    ((2, 7), (4, 3), (6,)), ((2, 3), (5,), (2, 4)), ((3,), (2, 2, 3), (5, 2))])
def test_values_and_gradients_match_tensordot(lead, in_shape, out_shape):
    with jax.enable_x64():
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((*lead, *in_shape)))
        w = jnp.asarray(rng.standard_normal((*in_shape, *out_shape)))
        n = len(in_shape)
        ref = lambda x, w: jnp.tensordot(x, w, axes=(tuple(range(x.ndim - n, x.ndim)),
                                                     tuple(range(n))))
        ours = lambda x, w: flat_dot(x, w, n)
        np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-12, atol=1e-12)
        assert ours(x, w).shape == (*lead, *out_shape)
        cot = jnp.asarray(rng.standard_normal((*lead, *out_shape)))
        g_ref = jax.grad(lambda x, w: jnp.sum(ref(x, w) * cot), argnums=(0, 1))(x, w)
        g_ours = jax.grad(lambda x, w: jnp.sum(ours(x, w) * cot), argnums=(0, 1))(x, w)
        for a, b in zip(g_ours, g_ref):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_mismatched_axes_are_one_clear_error():
    with pytest.raises(ValueError, match="cannot contract input axes"):
        flat_dot(jnp.ones((2, 5)), jnp.ones((4, 3)))


def test_model_logits_and_grads_match_a_tensordot_model(monkeypatch):
    """The whole model (PDR, GQA, SwiGLU, tied head) with every flat_dot swapped for
    tensordot gives the same logits and parameter gradients."""
    from perspective_jax.config import ModelConfig
    from perspective_jax.model import layers, transformer
    from perspective_jax.model.transformer import PerspectiveLM, init_params
    cfg = ModelConfig(vocab_size=37, d_model=32, n_layers=2, layer_pattern=("pdr", "gqa"),
                      d_ff=48, pdr_rank=8,
                      n_heads=2, n_kv_heads=1, head_dim=16, window=8)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)

    def loss(p):
        logits = PerspectiveLM(cfg).apply({"params": p}, tokens)[0]
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    (_, ours), g_ours = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    def tensordot(x, w, n_in=1):
        return jnp.tensordot(x, w, axes=(tuple(range(x.ndim - n_in, x.ndim)),
                                         tuple(range(n_in))))
    for module in (layers, transformer):
        monkeypatch.setattr(module, "flat_dot", tensordot)
    import perspective_jax.model.pdr as pdr
    monkeypatch.setattr(pdr, "flat_dot", tensordot)
    (_, ref), g_ref = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=2e-5)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
