"""The engine computes what the in-memory model computes under its variants:
int8 expert activations (ternary.activation_bits=8) and every extension point
(routing policy, final transform, residual injection, LoRA adapters on W_p)."""

import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.options import EngineOptions
from perspective_jax.model.extensions import Extensions, RoutePolicy, init_lora
from perspective_jax.model.transformer import init_params
from streaming_helpers import (assert_engine_matches, export_model, reference_logits,
                               routed_cfg, similar_experts)


def test_engine_with_int8_activations_equals_the_model_with_int8_activations(
        tmp_path, small_cfg):
    cfg = routed_cfg(small_cfg, activation_bits=8)
    params = init_params(cfg.model, jax.random.key(3), moe=cfg.moe)
    params = similar_experts(params, cfg, jax.random.key(4))
    for i, kind in enumerate(cfg.model.layer_pattern):   # large experts: the int8 rounding
        if kind == "pdr":                                 # of their inputs shows in the logits
            ffn = params["periods"][f"layer_{i}"]["ffn"]
            ffn["w_down"] = ffn["w_down"] * 5
    path = export_model(tmp_path, cfg, params, name="act8")
    rng = np.random.default_rng(8)
    prompt, steps = rng.integers(0, 259, 13), rng.integers(0, 259, 6)
    ref = reference_logits(cfg, params, prompt, steps)
    float_acts = reference_logits(routed_cfg(small_cfg), params, prompt, steps)
    assert max(np.abs(a - b).max() for a, b in zip(ref, float_acts)) > 1e-3   # it matters
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1, device_slots=3))
    assert engine.activation_bits == 8
    assert_engine_matches(engine, ref, prompt, steps)
    engine.close()


def _decode(engine, prompt, steps, ext=None):
    state = engine.new_state()
    out, state = engine.forward(prompt, state, ext=ext)
    logits = [out]
    for tok in steps:
        out, state = engine.forward(np.array([tok]), state, ext=ext)
        logits.append(out)
    return np.stack(logits)


def _extensions(cfg, neutral: bool) -> dict:
    """One Extensions per extension point: neutral settings, or ones that change logits."""
    d = cfg.model.d_model
    lora = init_lora(cfg.model, jax.random.key(5))
    if not neutral:                                   # b ≠ 0: the adapters act
        lora = jax.tree.map(lambda a: a + 0.05, lora)
    vec = np.zeros(d, np.float32) if neutral else np.linspace(-1, 1, d, dtype=np.float32)
    out = {"transform": Extensions(final_transform=(lambda x, _: (x, {})) if neutral else
                                   (lambda x, _: (1.5 * x - 0.1 * jnp.roll(x, 1, axis=-1), {}))),
           "inject": Extensions(inject_layer=5, inject=jnp.asarray(vec)),
           "adapters": Extensions(adapters=lora)}
    if neutral:
        out["route"] = Extensions(route=RoutePolicy("nearest"))
    else:
        out.update({f"route {m}": Extensions(route=RoutePolicy(m, k=1, seed=3))
                    for m in ("kth", "antipode", "random")})
    return out


def test_neutral_extensions_give_the_plain_logits_bit_for_bit(exported):
    cfg, _, path = exported
    prompt, steps = np.arange(20, 29), np.array([3, 141, 59, 26])
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1, device_slots=3))
    plain = _decode(engine, prompt, steps)
    for name, ext in _extensions(cfg, neutral=True).items():
        np.testing.assert_array_equal(_decode(engine, prompt, steps, ext), plain,
                                      err_msg=name)
    engine.close()


def test_extensions_give_the_in_memory_models_logits(exported):
    cfg, params, path = exported
    prompt, steps = np.arange(40, 51), np.array([7, 250, 18, 99])
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1, device_slots=3))
    plain = _decode(engine, prompt, steps)
    for name, ext in _extensions(cfg, neutral=False).items():
        got = _decode(engine, prompt, steps, ext)
        want = np.stack(reference_logits(cfg, params, prompt, steps, ext))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)
        assert np.abs(got - plain).max() > 1e-3, name           # the extension acts
    engine.close()
