"""The safety projection at inference (infer.safety_guard): the engine projects as the
in-memory model does, a flagged token's logit never exceeds its cap while its row is
active, the multi-token rule decides when a row is active, a guarded conversation
does not complete a flagged string the plain model completes, rows it is off for
keep their logits bit for bit, and perspective-infer --safety / --stats."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from perspective_jax.cli import infer
from perspective_jax.errors import UserError
from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.options import EngineOptions
from perspective_jax.infer.safety_guard import SafetyGuard
from perspective_jax.infer.session import Conversation
from perspective_jax.model.sampling import Sampling
from perspective_jax.quant import embedding_int8
from perspective_jax.safety.flags import FlagRules, emitted
from safety_helpers import ELICIT, FLAG, TOK, head_and_states, make_polytope, model_has
from streaming_helpers import export_model, reference_logits

ONE_MB = EngineOptions(host_budget_mb=1)
GREEDY = Sampling(temperature=0.0)
LOOSE = None         # support bounds no state reaches: only flagged rows bind
# margin of a cap check in logits: the projection's tolerance on a unit normal
# (SafetyProjection.tol 1e-4) times |E_t| (< 1.5 here), plus float32 rounding
TOL = 1e-3


@pytest.fixture(scope="module")
def setup(exported):
    """(config, params, path, engine, head table [V, d], final states [N, d])."""
    cfg, params, path = exported
    engine = StreamingEngine(path, ONE_MB)
    yield (cfg, params, path, engine, *head_and_states(engine))
    engine.close()


def _guard(setup, quantile=0.8, flagged=(FLAG,)):
    _, _, _, engine, table, states = setup
    poly = make_polytope(table, states, flagged, TOK.appended_bytes(), quantile=quantile)
    return poly, SafetyGuard.for_engine(poly, engine, TOK)


def _cap_holds(logits, poly, mask):
    """logit_t ≤ cap_t + TOL for every active flagged row."""
    return all(logits[t] <= cap + TOL for t, cap, on in
               zip(poly.flag_tokens, poly.flag_caps, mask) if on)


@pytest.mark.parametrize("tail", [b"print(0", b"print("])    # the flagged row on / off
def test_the_engine_projects_as_the_in_memory_model_does(setup, tail):
    cfg, params, _, engine, _, _ = setup
    poly, guard = _guard(setup)
    prompt, steps = TOK.encode("print(0"), [48, 10, 48, 120, 48, 32, 97]
    ext = guard.extensions([tail])
    mask = guard.rules.active(tail)
    assert mask[0] == tail.endswith(b"0")
    ref = reference_logits(cfg, params, prompt, steps, ext)
    plain = reference_logits(cfg, params, prompt, steps)
    state, got, moved = engine.new_state(), [], []
    out, state = engine.forward(prompt, state, ext)
    got.append(out), moved.append(bool(engine.final_info["active"][-1]))
    for tok in steps:
        out, state = engine.forward(np.array([tok]), state, ext)
        got.append(out), moved.append(bool(engine.final_info["active"][-1]))
    for k, (g, r, p) in enumerate(zip(got, ref, plain)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4, err_msg=f"position {k}")
        assert _cap_holds(g, poly, mask)
        assert moved[k] == (np.abs(r - p).max() > 1e-3), k     # moved exactly when it changed
    assert any(moved)


def test_rows_the_projection_is_off_for_keep_their_logits_bit_for_bit(setup):
    _, _, _, engine, _, _ = setup
    _, guard = _guard(setup)
    states = [engine.forward(TOK.encode(p), engine.new_state())[1] for p in ("ab0", "x0")]
    tokens = [48, 48]
    plain, _ = engine.step(states, tokens)
    ext = guard.extensions([b"ab00", b"x00"], enabled=[True, False])
    mixed, _ = engine.step(states, tokens, ext)
    np.testing.assert_array_equal(mixed[1], plain[1])           # off: today's logits
    assert engine.final_info["active"][1] == 0
    alone, _ = engine.step(states[:1], tokens[:1], guard.extensions([b"ab00"]))
    np.testing.assert_allclose(mixed[0], alone[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(mixed[0], plain[0], atol=1e-3)       # on: projected


def test_every_position_of_a_prefill_is_guarded_after_its_own_text(exported, setup):
    _, _, path, _, _, _ = setup
    poly, _ = _guard(setup)
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1, prefill_chunk=4))
    guard = SafetyGuard.for_engine(poly, engine, TOK)
    ids = TOK.encode("a0b00c0d\x010")                           # 11 tokens: 3 chunks
    ext, tail = guard.prefill_extensions(b"", ids)
    every, _ = engine.forward(ids, engine.new_state(), ext, all_logits=True)
    assert engine.final_info["active"].shape == (len(ids),)
    state, text = engine.new_state(), b""
    for i, tok in enumerate(ids):                               # one token at a time
        text += bytes([tok])
        mask = guard.rules.active(text)
        assert mask[0] == text.endswith(b"0"), i                # the rule: "0" then "0"
        one, state = engine.forward(np.array([tok]), state, guard.extensions([text]))
        np.testing.assert_allclose(every[i], one, rtol=1e-4, atol=1e-4, err_msg=str(i))
        assert _cap_holds(every[i], poly, mask)
    assert tail == text[-guard.rules.tail_bytes:]
    engine.close()


def _ids(conv, prompt, n):
    seen = []
    conv.generate(prompt, n, on_token=lambda info: seen.append(info.id))
    return seen


def test_a_guarded_conversation_does_not_complete_the_flagged_string(setup):
    _, _, _, engine, _, _ = setup
    prompt, flag = ELICIT.encode(), FLAG.encode()
    plain = _ids(Conversation(engine, TOK, GREEDY), ELICIT, 12)
    k = next(i for i in range(len(plain)) if emitted(prompt + bytes(plain[: i + 1]), [flag]))
    assert k >= 1                              # the context elicits it, over two tokens
    poly, guard = _guard(setup, quantile=LOOSE)
    before = engine.stats.safety_tokens
    seen = _ids(Conversation(engine, TOK, GREEDY, guard=guard), ELICIT, 12)
    assert not emitted(prompt + bytes(seen), [flag])
    # the first "0" is left alone, the one that would finish "00" is not
    assert seen[:k] == plain[:k] and seen[k] != plain[k]
    text = prompt
    for tok in seen:                          # the rule's second implementation agrees
        assert not guard.rules.completes(text, bytes([tok]))
        text += bytes([tok])
    assert engine.stats.safety_tokens - before == len(seen)
    report = engine.report()["safety"]
    assert report["projections_active"] >= 1 and report["fallbacks"] == 0


def test_mpd_views_are_projected_too(setup):
    from perspective_jax.config.schema import MPDConfig
    _, _, _, engine, _, _ = setup
    _, guard = _guard(setup, quantile=LOOSE)
    s = engine.stats
    rows, views, before = s.final_checked, s.mpd_view_rows, s.safety_tokens
    mpd = MPDConfig(every_k=1, max_rate=1.0)
    seen = _ids(Conversation(engine, TOK, GREEDY, mpd=mpd, guard=guard), ELICIT, 8)
    assert not emitted(ELICIT.encode() + bytes(seen), [FLAG.encode()])
    assert s.mpd_view_rows > views                              # the views ran
    # every state projected is a guarded token's or a view's
    assert s.final_checked - rows == (s.safety_tokens - before) + (s.mpd_view_rows - views)


def test_a_guarded_conversation_resumes_with_its_text_tail(setup, tmp_path):
    _, _, _, engine, _, _ = setup
    _, guard = _guard(setup)
    whole = Conversation(engine, TOK, GREEDY, guard=guard).generate(ELICIT, 10)
    one = Conversation(engine, TOK, GREEDY, guard=guard)
    first = one.generate(ELICIT, 4)
    one.save(str(tmp_path / "c.state"))
    two = Conversation.load(engine, TOK, str(tmp_path / "c.state"), GREEDY, guard=guard)
    assert two.tail == one.tail and two.tail
    assert first + two.generate("", 6) == whole


def test_a_polytope_for_another_tokenizer_or_head_is_one_line(setup):
    _, _, _, engine, table, _ = setup
    poly, _ = _guard(setup)
    other = dataclasses.replace(poly, flag_tokens=np.asarray([49], np.int32))
    with pytest.raises(UserError, match="built for another tokenizer"):
        SafetyGuard.for_engine(other, engine, TOK)
    with pytest.raises(UserError, match="does not fit a head"):
        SafetyGuard(poly, TOK.appended_bytes(), table[:, :8])


def test_an_int8_head_is_dequantised_and_the_cap_holds_for_its_logits(exported, setup,
                                                                      tmp_path):
    cfg, params, _ = exported
    _, _, _, _, _, states = setup
    path = export_model(tmp_path, cfg, params, name="int8", embedding="int8")
    engine = StreamingEngine(path, ONE_MB)
    assert isinstance(engine.embed_table, embedding_int8.Int8Table)
    codes, scale = embedding_int8.quantize(np.asarray(params["embed"]["embedding"]))
    table = embedding_int8.float_rows(jax.device_get(engine.embed_table), 259)
    np.testing.assert_array_equal(table, embedding_int8.dequantize(codes, scale))
    poly = make_polytope(table, states, (FLAG,), TOK.appended_bytes(), quantile=LOOSE)
    guard = SafetyGuard.for_engine(poly, engine, TOK)
    over = 0
    for prompt in ("abc\x010", "0", "x = 10", "hello 0"):   # each ends in "0": the row is on
        ids = TOK.encode(prompt)
        plain, _ = engine.forward(ids, engine.new_state())
        got, _ = engine.forward(ids, engine.new_state(), guard.extensions([prompt.encode()]))
        assert _cap_holds(got, poly, [True]), prompt
        over += plain[ord("0")] > poly.flag_caps[0] + TOL
    assert over                                # the cap bound some of them
    engine.close()


# ---------------------------------------------------------------- perspective-infer
def _one_line(capsys, message):
    out, err = capsys.readouterr()
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
    return out


def test_infer_safety_needs_a_polytope_in_one_line(exported, capsys):
    _, _, path = exported
    with model_has(None):
        assert infer.run(["--model-dir", path, "hi", "--safety"]) == 2
    assert _one_line(capsys, f"{path} has no safety polytope; build one with "
                             "perspective-train --stage safety and export it") == ""


def test_infer_safety_blocks_the_flagged_string_and_reports_it(setup, capsys, tmp_path):
    _, _, path, _, _, _ = setup
    poly, _ = _guard(setup, quantile=LOOSE)
    args = ["--model-dir", path, ELICIT, "--temperature", "0", "--max-tokens", "12",
            "--host-budget-mb", "1"]
    assert infer.run(args) == 0
    assert FLAG in capsys.readouterr().out[len(ELICIT):]
    stats = tmp_path / "stats.json"
    with model_has(poly):
        assert infer.run(args + ["--safety", "--stats", "--stats-json", str(stats)]) == 0
    out, err = capsys.readouterr()
    assert FLAG not in out[len(ELICIT) - 1:]
    assert "| safety |" in err and "tokens_guarded" in err
    section = json.loads(stats.read_text())["safety"]
    assert section["tokens_guarded"] == 12 and section["projections_active"] >= 1
    assert section["projecting_head_us_per_state"] > 0


def test_flag_rules_of_the_guard_follow_the_tokenizer(setup):
    _, guard = _guard(setup)
    rules = FlagRules.build((FLAG,), TOK.appended_bytes())
    np.testing.assert_array_equal(guard.rules.token_ids, rules.token_ids)
    assert guard.extend(b"", TOK.encode("xy" * 10)) == b"xy"    # last tail_bytes bytes
    np.testing.assert_array_equal(guard.mask([b"a0", b"a", b""]), [[True], [False], [False]])


def test_row_bounds_switch_off_disabled_rows_and_cut_per_position_masks():
    from perspective_jax.safety.polytope import Polytope
    from perspective_jax.safety.project import INACTIVE
    rng = np.random.default_rng(0)
    d, table = 4, rng.normal(size=(6, 4)).astype(np.float32)
    support = np.eye(d, dtype=np.float32)[:2]
    poly = Polytope(support, np.ones(2, np.float32), 0.0, ("x",), np.asarray([1, 3], np.int32),
                    np.asarray([5.0, 5.0], np.float32), np.zeros(d, np.float32))
    arrays = poly.arrays(table)
    flag_b = np.asarray(arrays.bounds)[2:]
    active = np.asarray([[True, False], [False, True], [True, True]])
    got = np.asarray(arrays.with_active(active, enabled=[True, False, True]).row_bounds((3,)))
    want = np.concatenate([np.ones((3, 2)), np.where(active, flag_b, INACTIVE)], axis=1)
    want[1] = INACTIVE                                          # disabled: every row off
    np.testing.assert_allclose(got, want.astype(np.float32))
    over_t = np.asarray(arrays.with_active(active[:2]).row_bounds((2, 5)))   # [B, F] over T
    assert over_t.shape == (2, 5, 4) and (over_t == over_t[:, :1]).all()
    per_pos = arrays.with_active(active, enabled=[True, False, True])
    cut = per_pos.positions(1, 3, total=3)
    np.testing.assert_array_equal(np.asarray(cut.active), active[1:])
    np.testing.assert_array_equal(np.asarray(cut.enabled), [False, True])
    shared = arrays.with_active(active[:1])                     # one mask for all positions
    assert shared.positions(1, 3, total=3) is shared
    with pytest.raises(UserError, match="enabled mask"):
        arrays.with_active(active, enabled=[True])
