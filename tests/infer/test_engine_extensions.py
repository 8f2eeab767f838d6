"""The engine computes what the in-memory model computes under its variants:
int8 expert activations (ternary.activation_bits=8)."""

import jax
import numpy as np

from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.options import EngineOptions
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
