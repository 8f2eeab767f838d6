"""The streaming engine's learned prefetch predictor (`--predictor learned`): the
exported heads guess layer j+1's expert and the next token's layer-0 expert, prefetch
never changes what is decoded, --stats scores the two kinds of guess apart, and a model
directory without (trained) heads falls back to the router."""

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from perspective_jax.config.param_layout import expert_layers
from perspective_jax.errors import UserError
from perspective_jax.export.exporter import with_ternary_experts
from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.options import EngineOptions
from perspective_jax.infer.predictor import Predictor
from perspective_jax.model.routed_ffn import NEXT_TOKEN_PREDICTOR, PREDICTOR
from perspective_jax.model.transformer import PerspectiveLM, init_params, is_predictor_path
from perspective_jax.modeldir import format as md
from streaming_helpers import (assert_engine_matches, export_model, reference_logits,
                               routed_cfg, similar_experts, train_heads)

RNG = np.random.default_rng(11)
PROMPT, STEPS = RNG.integers(0, 259, 6), RNG.integers(0, 259, 5)


def _with_heads(params, key):
    """params whose predictor heads are random (non-zero: 'trained')."""
    def fill(path, a):
        name = "/".join(str(k.key) for k in path)
        if not is_predictor_path(name):
            return a
        return np.asarray(jax.random.normal(jax.random.fold_in(key, hash(name) % 997),
                                            a.shape)) / np.sqrt(a.shape[-2])
    return jax.tree_util.tree_map_with_path(fill, params)


def _without_heads(params):
    out = {k: v for k, v in params.items() if k != NEXT_TOKEN_PREDICTOR}
    periods = {}
    for name, layer in params["periods"].items():
        layer = dict(layer)
        if "ffn" in layer and PREDICTOR in layer["ffn"]:
            layer["ffn"] = {k: v for k, v in layer["ffn"].items() if k != PREDICTOR}
        periods[name] = layer
    return {**out, "periods": periods}


@pytest.fixture(scope="module")
def headed(tmp_path_factory):
    from conftest import _small_cfg
    cfg = routed_cfg(_small_cfg())
    params = init_params(cfg.model, jax.random.key(0), moe=cfg.moe)
    params = _with_heads(similar_experts(params, cfg, jax.random.key(1)), jax.random.key(2))
    params = train_heads(cfg, params, np.concatenate([PROMPT, STEPS])[None], steps=4)
    tmp = tmp_path_factory.mktemp("learned")
    return cfg, params, export_model(tmp, cfg, params), tmp


def _expected_right(cfg, params):
    """(right, guesses) of head (a) over the decode tokens and of head (b) for each
    decode token's layer 0, from the in-memory model's sown choices and head logits
    (their argmax is what the engine must reproduce)."""
    model = PerspectiveLM(cfg.model, cfg.moe)
    used = with_ternary_experts(jax.tree.map(np.asarray, params), cfg)
    tokens = np.concatenate([PROMPT, STEPS])[None]
    _, state = model.apply({"params": used}, tokens, mutable=["aux"])
    aux = state["aux"]
    walk = expert_layers(cfg.model)
    choice = [np.asarray(aux["periods"][f"layer_{i}"]["ffn"]["choice"][0][p][0]) for p, i in walk]
    guess = [np.asarray(aux["periods"][f"layer_{i}"]["ffn"]["next_logits"][0][p][0]).argmax(-1)
             for p, i in walk]
    first = np.asarray(aux["next_token_logits"][0][0]).argmax(-1)
    decode = range(len(PROMPT), tokens.shape[1])            # positions fed one by one
    layer = [guess[j][t] == choice[j + 1][t] for t in decode for j in range(len(walk) - 1)]
    token = [first[t - 1] == choice[0][t] for t in decode]
    return (sum(layer), len(layer)), (sum(token), len(token))


def test_exported_heads_are_in_the_shared_tensors(headed):
    cfg, params, path, _ = headed
    shared = load_file(f"{path}/{md.SHARED_FILE}")
    np.testing.assert_array_equal(shared[f"{NEXT_TOKEN_PREDICTOR}/w"],
                                  params[NEXT_TOKEN_PREDICTOR]["w"])
    np.testing.assert_array_equal(shared[f"periods/layer_0/ffn/{PREDICTOR}/w"],
                                  params["periods"]["layer_0"]["ffn"][PREDICTOR]["w"])


def test_learned_predictor_decodes_the_same_and_scores_both_kinds(headed):
    """--predictor learned: logits equal the in-memory model's (as the router's do);
    every decode token scores L-1 layer guesses and one next-token layer-0 guess, and
    the right counts are those of the heads' argmax on the in-memory model."""
    cfg, params, path, _ = headed
    ref = reference_logits(cfg, params, PROMPT, STEPS)
    (layer_right, layer_n), (token_right, token_n) = _expected_right(cfg, params)
    results = {}
    for mode in ("learned", "router"):
        engine = StreamingEngine(path, EngineOptions(host_budget_mb=1, device_slots=2,
                                                     predictor=mode))
        assert_engine_matches(engine, ref, PROMPT, STEPS)
        engine.close()
        results[mode] = engine.report()
    learned, router = results["learned"], results["router"]
    assert learned["learned_predictor"] == "available"
    assert router["prefetch_guesses_next_token_layer0"] == 0     # the router: none
    assert learned["prefetch_guesses_next_layer"] == layer_n == len(STEPS) * (
        len(expert_layers(cfg.model)) - 1)
    assert learned["prefetch_guesses_next_token_layer0"] == token_n == len(STEPS)
    assert learned["prefetch_accuracy_next_layer"] == pytest.approx(layer_right / layer_n)
    assert learned["prefetch_accuracy_next_token_layer0"] == pytest.approx(
        token_right / token_n)
    assert router["prefetch_guesses_next_layer"] == layer_n


def test_next_token_guess_is_queued_with_the_tiers(headed):
    """After each feed the next token's layer-0 guess is queued (the tiers count it as
    a prediction): decode steps × (L−1) layer guesses + one per feed."""
    cfg, params, path, _ = headed
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1, device_slots=2,
                                                 predictor="learned"))
    state = engine.new_state()
    _, state = engine.forward(PROMPT, state)
    assert engine.tiers._pending is not None and engine.tiers._pending.key[0] == 0
    for tok in STEPS:
        _, state = engine.forward(np.array([tok]), state)
    engine.close()
    n_layers = len(engine.expert_layers)
    assert engine.stats.predictions == len(STEPS) * (n_layers - 1) + 1 + len(STEPS)


def test_auto_uses_the_learned_heads_among_its_candidates(headed):
    """"auto" (the default) computes the learned guesses too; exact with a chunked
    prefill (the layer-0 guess follows only the feed's last chunk) and a pinned tier."""
    cfg, params, path, _ = headed
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1, device_slots=2,
                                                 prefill_chunk=4,
                                                 host_memory_kind="pinned_host"))
    assert engine.predictor.uses_learned and engine.predictor.uses_router
    ref = reference_logits(cfg, params, PROMPT, STEPS)
    assert_engine_matches(engine, ref, PROMPT, STEPS)
    engine.close()
    assert engine.stats.token_guesses == len(STEPS)


@pytest.mark.parametrize("kind", ["absent", "zero"])
def test_model_dir_without_trained_heads_falls_back_to_the_router(headed, kind):
    cfg, params, _, tmp = headed
    if kind == "absent":
        shaped = _without_heads(params)
    else:
        shaped = jax.tree_util.tree_map_with_path(
            lambda p, a: np.zeros_like(a) if is_predictor_path(
                "/".join(str(k.key) for k in p)) else a, params)
    path = export_model(tmp, cfg, shaped, name=f"no-heads-{kind}")
    if kind == "absent":
        assert f"{NEXT_TOKEN_PREDICTOR}/w" not in load_file(f"{path}/{md.SHARED_FILE}")
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1, device_slots=2,
                                                 predictor="learned"))
    ref = reference_logits(cfg, params, PROMPT, STEPS)
    assert_engine_matches(engine, ref, PROMPT, STEPS)
    engine.close()
    rep = engine.report()
    assert rep["learned_predictor"].startswith("absent" if kind == "absent" else "untrained")
    assert engine.predictor.uses_router and not engine.predictor.uses_learned
    assert rep["prefetch_guesses_next_layer"] == len(STEPS) * (len(engine.expert_layers) - 1)
    assert rep["prefetch_guesses_next_token_layer0"] == 0


def test_predictor_choice_is_checked():
    assert "learned" in Predictor.__init__.__globals__["PREDICTORS"]
    EngineOptions(predictor="learned")
    with pytest.raises(UserError, match="prefetch predictor"):
        EngineOptions(predictor="oracle")


def test_predictor_scores_guesses_by_kind():
    """A unit check of the scoring: a layer guess and a next-token guess, right and
    wrong, land in their own counters; a prefill drops a pending guess unscored."""
    from perspective_jax.infer.stats import Stats
    stats = Stats()
    pred = Predictor("learned", 3, learned=True, stats=stats)
    assert pred.predict(0, {"learned": 2}) == (1, 2)
    pred.observe(1, 2)
    assert pred.predict(1, {"learned": 0}) == (2, 0)
    pred.observe(2, 1)
    assert pred.predict(2, {"learned": 0}) is None           # no layer after the last
    assert pred.predict_first(4) == (0, 4)
    pred.observe(0, 4)
    assert pred.predict_first(5) == (0, 5)
    pred.drop(0)
    pred.observe(0, 5)
    assert (stats.layer_guesses, stats.layer_guesses_right) == (2, 1)
    assert (stats.token_guesses, stats.token_guesses_right) == (1, 1)
    assert Predictor("router", 3, learned=True).predict_first(1) is None
