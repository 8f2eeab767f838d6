"""The memory consulted where MPD's views find no majority (SPEC §3.6–3.7): the value's
vector is injected after the middle layer and the token drawn again — in memory
(`generate_mpd(recall=…)`) and on the streaming engine (`Conversation(memory=…)`),
which must decide the same tokens; with no recall the output is today's."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perspective_jax.config.schema import MPDConfig
from perspective_jax.data.byte_tokenizer import ByteTokenizer
from perspective_jax.errors import UserError
from perspective_jax.export.exporter import with_ternary_experts
from perspective_jax.infer import compute
from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.options import EngineOptions
from perspective_jax.infer.session import Conversation
from perspective_jax.memory.codebook import Codebook
from perspective_jax.memory.memory_file import MemoryFile
from perspective_jax.memory.recall import (MemoryRecall, RecallConfig, TextCodec,
                                           matched_prefix)
from perspective_jax.memory.store import HDMemory, MemoryParams
from perspective_jax.model.extensions import Extensions
from perspective_jax.model.generate import generate_mpd
from perspective_jax.model.mpd import UNCERTAIN
from perspective_jax.model.sampling import Sampling
from perspective_jax.model.transformer import PerspectiveLM, init_cache

GREEDY = Sampling(temperature=0)
# every step triggers; anything short of four equal argmaxes is "no majority"
UNSURE = MPDConfig(every_k=1, p_min=0.0, h_max=100.0, tau=1e-5, min_votes=4, max_rate=1.0)
PROMPT, N = "The ", 8          # the views disagree at steps 1, 2 and 6 on this model


def _recall(cfg, embed_rows, scale=4.0):
    """A one-bank memory holding one pair: every lookup finds its value."""
    tok = ByteTokenizer()
    params = MemoryParams(dim=1024, n_banks=1, seed=3)
    book = Codebook(cfg.model.d_model, params.dim, params.seed)
    codec = TextCodec(lambda t: tok.encode(t), embed_rows, book)
    mem = HDMemory.new(params)
    mem.add(codec.encode("MPD: "), codec.encode("zqx"), key="MPD: ", value="zqx")
    mf = MemoryFile(mem, book.centre, None)
    n_layers = cfg.model.n_periods * len(cfg.model.layer_pattern)
    return MemoryRecall(mf, codec, RecallConfig(min_similarity=0.5, inject_scale=scale,
                                                window=6), n_layers)
    # (window 6: the reference below re-derives the context from the last 6 ids)


def _in_memory(cfg, params):
    used = with_ternary_experts(jax.tree.map(np.asarray, params), cfg)
    table = np.asarray(used["embed"]["embedding"], np.float32)
    return used, lambda ids: table[np.asarray(ids)] * math.sqrt(cfg.model.d_model)


def _streamed(path, recall_of):
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1, device_slots=3))
    rows = lambda ids: np.asarray(compute.embed(engine.model, engine.embed_table,  # noqa
                                                jnp.asarray(ids)[None]))[0]
    recall = recall_of(rows)
    conv = Conversation(engine, ByteTokenizer(), GREEDY, mpd=UNSURE, memory=recall)
    infos = []
    conv.generate(PROMPT, N, on_token=infos.append)
    report = engine.report()
    engine.close()
    return infos, report, recall


@pytest.mark.slow
def test_streamed_recall_equals_in_memory_recall(exported_distinct):
    cfg, params, path = exported_distinct
    used, rows = _in_memory(cfg, params)
    ids = ByteTokenizer().encode(PROMPT)[None]
    bits = cfg.ternary.activation_bits
    recall = _recall(cfg, rows)
    tokens, steps = generate_mpd(cfg.model, used, ids, N, UNSURE, GREEDY, moe=cfg.moe,
                                 activation_bits=bits, recall=recall)
    plain, plain_steps = generate_mpd(cfg.model, used, ids, N, UNSURE, GREEDY, moe=cfg.moe,
                                      activation_bits=bits)
    uncertain = [bool(s.kind[0] == UNCERTAIN) for s in steps]
    assert any(uncertain), "the views never disagreed: the test model cannot test recall"
    assert [bool(s.recalled[0]) for s in steps] == uncertain     # every lookup hits
    assert recall.counts == {"lookups": sum(uncertain), "hits": sum(uncertain),
                             "injections": sum(uncertain)}
    assert tokens.tolist() != plain.tolist()                    # the value changed the text

    infos, report, streamed = _streamed(path, lambda r: _recall(cfg, r))
    assert [i.id for i in infos] == tokens[0].tolist()
    assert [i.kind for i in infos] == [int(s.kind[0]) for s in steps]
    assert [i.recalled for i in infos] == uncertain
    assert report["memory"] == {"lookups": sum(uncertain), "hits": sum(uncertain),
                                "injections": sum(uncertain)}
    assert streamed.counts == recall.counts
    assert report["decode_tokens"] == N          # injected steps are not tokens


def test_recalled_token_is_the_argmax_of_the_injected_step(exported_distinct):
    """Reference: the same step run by hand with Extensions(inject=…) after the middle
    layer, from the text decided so far, at the first step the views disagreed."""
    cfg, params, _ = exported_distinct
    used, rows = _in_memory(cfg, params)
    bits = cfg.ternary.activation_bits
    recall = _recall(cfg, rows)
    ids = ByteTokenizer().encode(PROMPT)[None]
    tokens, steps = generate_mpd(cfg.model, used, ids, 3, UNSURE, GREEDY, moe=cfg.moe,
                                 activation_bits=bits, recall=recall)
    k = next(i for i, s in enumerate(steps) if s.kind[0] == UNCERTAIN)
    assert steps[k].recalled[0]
    text = np.concatenate([ids, tokens[:, :k]], axis=1)          # what was fed by step k
    model = PerspectiveLM(cfg.model, cfg.moe, activation_bits=bits)
    _, cache = model.apply({"params": used}, jnp.asarray(text[:, :-1]),
                           cache=init_cache(cfg.model, 1))
    vec = recall.last.vector
    ext = Extensions(inject_layer=recall.inject_layer, inject=jnp.asarray(vec)[None])
    logits, _ = model.apply({"params": used}, jnp.asarray(text[:, -1:]), cache=cache, ext=ext)
    assert int(tokens[0, k]) == int(np.argmax(np.asarray(logits[0, -1])))
    plain, _ = model.apply({"params": used}, jnp.asarray(text[:, -1:]), cache=cache)
    assert not np.allclose(np.asarray(plain), np.asarray(logits))   # the value mattered
    assert recall.inject_layer == (cfg.model.n_periods * len(cfg.model.layer_pattern) - 1) // 2
    value = ByteTokenizer().encode("zqx")
    said = matched_prefix(text[0, -6:].tolist(), value.tolist())
    np.testing.assert_allclose(vec, 4.0 * rows(value[said:said + 1])[0], rtol=1e-6)


def test_next_token_injection_follows_the_value():
    """matched_prefix against a sequential reference; the recall injects the value's
    next token, then none once the value is complete; "mean" injects the mean."""
    assert matched_prefix([5, 1, 2], [1, 2, 3]) == 2
    assert matched_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert matched_prefix([9, 9], [1, 2]) == 0
    assert matched_prefix([1, 1], [1, 1, 2]) == 2
    rng = np.random.default_rng(0)
    for _ in range(200):
        ctx, val = rng.integers(0, 3, 6).tolist(), rng.integers(0, 3, 4).tolist()
        ref = max([k for k in range(0, 5) if k <= len(ctx) and ctx[len(ctx) - k:] == val[:k]])
        assert matched_prefix(ctx, val) == ref
    table = np.random.default_rng(1).normal(size=(259, 8)).astype(np.float32)
    rows = lambda ids: table[np.asarray(ids)]                        # noqa: E731
    tok = ByteTokenizer()
    book = Codebook(8, 256, 0)
    codec = TextCodec(lambda t: tok.encode(t), rows, book)
    mem = HDMemory.new(MemoryParams(dim=256, n_banks=1))
    mem.add(codec.encode("k"), codec.encode("abc"), key="k", value="abc")
    mf = MemoryFile(mem, book.centre, None)
    nxt = MemoryRecall(mf, codec, RecallConfig(min_similarity=0.5, inject_scale=2.0), 4)
    ids = lambda t: tok.encode(t).tolist()                           # noqa: E731
    np.testing.assert_allclose(nxt(ids("k=")).vector, 2 * table[ids("a")[0]])
    np.testing.assert_allclose(nxt(ids("k=ab")).vector, 2 * table[ids("c")[0]])
    assert nxt(ids("k=abc")) is None and nxt.counts["hits"] == 3
    mean = MemoryRecall(mf, codec, RecallConfig(min_similarity=0.5, inject="mean"), 4)
    np.testing.assert_allclose(mean(ids("k=ab")).vector, 4 * table[ids("abc")].mean(0),
                               rtol=1e-6)


@pytest.mark.slow
def test_no_recall_leaves_decoding_as_it_was(exported_distinct):
    """A memory whose values are never similar enough (threshold 1.0) is looked up but
    never injected: tokens and decisions equal decoding without a memory."""
    cfg, params, path = exported_distinct
    used, rows = _in_memory(cfg, params)

    def never(r):
        got = _recall(cfg, r)
        return MemoryRecall(got.file, got.codec, RecallConfig(min_similarity=1.0), 8)
    infos, report, _ = _streamed(path, never)
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1, device_slots=3))
    plain = []
    Conversation(engine, ByteTokenizer(), GREEDY, mpd=UNSURE).generate(
        PROMPT, N, on_token=plain.append)
    engine.close()
    assert [(i.id, i.kind, i.confidence) for i in infos] == [
        (i.id, i.kind, i.confidence) for i in plain]
    assert report["memory"]["lookups"] > 0 and report["memory"]["injections"] == 0


def test_memory_needs_mpd(exported):
    _, _, path = exported
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1, device_slots=3))
    try:
        with pytest.raises(UserError, match="--mpd"):
            Conversation(engine, ByteTokenizer(), GREEDY, memory=object())
    finally:
        engine.close()
