"""Routes that follow the context (moe.route_smoothing) on the streaming engine: the
engine carries each router's context average in the layer cache, so its logits equal
the in-memory model's (single sequence, batched rows, a saved and resumed state), and
the "previous" guesses it scores are exactly the in-memory model's repeats."""

import dataclasses

import jax
import numpy as np
import pytest

from perspective_jax.config import MoEConfig
from perspective_jax.config.param_layout import expert_layers
from perspective_jax.export.exporter import with_ternary_experts
from perspective_jax.infer import state as S
from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.options import EngineOptions
from perspective_jax.model.cache_io import load_cache, save_cache
from perspective_jax.model.transformer import PerspectiveLM, init_params
from streaming_helpers import (assert_engine_matches, export_model, reference_logits,
                               routed_cfg, similar_experts)

DECAY = 0.95
RNG = np.random.default_rng(5)
PROMPT, STEPS = RNG.integers(0, 259, 9), RNG.integers(0, 259, 24)


@pytest.fixture(scope="module")
def smoothed(tmp_path_factory):
    from conftest import _small_cfg
    cfg = routed_cfg(_small_cfg())
    cfg = dataclasses.replace(cfg, moe=MoEConfig(route_smoothing=DECAY))
    params = init_params(cfg.model, jax.random.key(0), moe=cfg.moe)
    params = similar_experts(params, cfg, jax.random.key(1))
    return cfg, params, export_model(tmp_path_factory.mktemp("smoothed"), cfg, params)


def test_engine_equals_the_in_memory_model_with_context_routing(smoothed):
    cfg, params, path = smoothed
    ref = reference_logits(cfg, params, PROMPT, STEPS)
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1, device_slots=2))
    assert engine.moe.route_smoothing == DECAY
    assert_engine_matches(engine, ref, PROMPT, STEPS)
    engine.close()


def test_batched_rows_and_a_resumed_state_carry_the_context_average(smoothed, tmp_path):
    cfg, params, path = smoothed
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1, device_slots=2))
    other = RNG.integers(0, 259, 5)
    ref_a = reference_logits(cfg, params, PROMPT, STEPS[:6])
    ref_b = reference_logits(cfg, params, other, STEPS[6:12])
    _, sa = engine.forward(PROMPT, engine.new_state())
    _, sb = engine.forward(other, engine.new_state())
    save_cache(sa.to_cache(), str(tmp_path / "a.cache"))
    resumed = type(sa).from_cache(load_cache(str(tmp_path / "a.cache"), cfg.model))
    route = np.asarray(resumed.layers[0][0].route)
    assert route.shape == (1, 4) and route[0, 3] > 1.0      # the average was saved
    batch = S.batch_of([resumed, sb])
    for k in range(6):
        logits, batch = engine.step_batch(batch, np.asarray([STEPS[k], STEPS[6 + k]]))
        np.testing.assert_allclose(logits[0], ref_a[k + 1], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(logits[1], ref_b[k + 1], rtol=1e-4, atol=1e-4)
    engine.close()


def test_previous_guesses_score_the_in_memory_repeats(smoothed):
    """With --predictor previous the engine guesses, for layer j+1 and for the next
    token's layer 0, the expert the previous token used there: its scored accuracy is
    exactly the in-memory model's share of repeats, and it is high with λ = 0.95."""
    cfg, params, path = smoothed
    model = PerspectiveLM(cfg.model, cfg.moe)
    used = with_ternary_experts(jax.tree.map(np.asarray, params), cfg)
    tokens = np.concatenate([PROMPT, STEPS])[None]
    _, state = model.apply({"params": used}, tokens, mutable=["aux"])
    walk = expert_layers(cfg.model)
    choice = [np.asarray(state["aux"]["periods"][f"layer_{i}"]["ffn"]["choice"][0][p][0])
              for p, i in walk]
    decode = range(len(PROMPT), tokens.shape[1])
    token = [choice[0][t] == choice[0][t - 1] for t in decode]
    layer = [choice[j + 1][t] == choice[j + 1][t - 1] for t in decode
             for j in range(len(walk) - 1)]
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1, device_slots=2,
                                                 predictor="previous"))
    st = engine.forward(PROMPT, engine.new_state())[1]
    for tok in STEPS:
        st = engine.forward(np.asarray([tok]), st)[1]
    s = engine.stats
    engine.close()
    assert (s.token_guesses_right, s.token_guesses) == (sum(token), len(token))
    assert (s.layer_guesses_right, s.layer_guesses) == (sum(layer), len(layer))
    assert sum(token) / len(token) > 0.5
