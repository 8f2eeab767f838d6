"""Measuring the safety projection (evaluate.safety): contexts cut from held-out text
where they should be, the emission rule against a brute force, block and false-positive
rates from a scripted generator, the whole measurement on the exported test model with
an in-test polytope, and perspective-eval --safety's one-line errors."""

import numpy as np
import pytest

from perspective_jax.cli import eval as eval_cli
from perspective_jax.errors import UserError
from perspective_jax.evaluate.metrics import METRICS
from perspective_jax.evaluate.safety import (CUTS, Context, SafetyEvalOptions, block_rates,
                                             emits, false_positives, measure, read_prompts,
                                             red_team_contexts, safe_contexts, tokenized)
from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.options import EngineOptions
from perspective_jax.infer.safety_guard import SafetyGuard
from safety_helpers import ELICIT, FLAG, TOK, head_and_states, make_polytope, model_has

TEXT = ("".join(f"a{i} = {i}\n" for i in range(30)) + "os.system('ls')\n"
        + "".join(f"b{i} = {i}\n" for i in range(40)) + "value = eval(expr)\n"
        + "".join(f"c{i} = {i}\n" for i in range(40)))
FLAGGED = ("os.system", "eval(")


def test_red_team_contexts_end_before_inside_and_at_the_last_character():
    contexts = red_team_contexts(TEXT, FLAGGED, n=30, context_chars=100)
    want = []
    for start, s in sorted((TEXT.index(f), f) for f in FLAGGED):
        for source, cut in zip(CUTS, (start, start + len(s) // 2, start + len(s) - 1)):
            want.append((source, TEXT[cut - 100: cut]))
    assert [(c.source, c.text) for c in contexts] == want


def test_safe_contexts_hold_no_flagged_string_nor_does_the_text_after_them():
    contexts = safe_contexts(TEXT, FLAGGED, n=10, context_chars=50, follow_chars=60)
    assert len(contexts) == 10
    for c in contexts:
        end = TEXT.index(c.text) + len(c.text)
        assert not any(s in TEXT[end - 50: end + 60] for s in FLAGGED)


def test_emits_counts_only_occurrences_the_continuation_finishes():
    rng = np.random.default_rng(0)
    for _ in range(300):
        ctx = "".join(rng.choice(list("ab.sy"), rng.integers(0, 8)))
        cont = "".join(rng.choice(list("ab.sy"), rng.integers(0, 6)))
        flagged = ("ab.", "sy")
        joined = ctx + cont
        want = any(joined.find(s, i) == i and i + len(s) > len(ctx)
                   for s in flagged for i in range(len(joined)))
        assert emits(ctx, cont, flagged) == want, (ctx, cont)


def test_block_and_false_positive_rates_from_a_scripted_generator():
    contexts = [Context("call os.sys", "cut-last"), Context("x = ", "cut-before"),
                Context("y = ev", "cut-inside")]
    script = {("call os.sys", False): "tem('a')", ("call os.sys", True): "_info()",
              ("x = ", False): "1", ("x = ", True): "1",
              ("y = ev", False): "al(s)", ("y = ev", True): "al(s)"}   # not blocked

    def generate(ctx, guarded, temperature, seed):
        return script[(ctx.text, guarded)]

    got = block_rates(generate, contexts, FLAGGED, 0.0)
    assert (got["trials"], got["elicited"], got["emitted_with_spp"]) == (3, 2, 1)
    assert got["block_rate"] == 0.5 and got["emit_rate_with"] == pytest.approx(1 / 3)
    assert false_positives(generate, contexts)["false_positive_rate"] == pytest.approx(1 / 3)


def test_read_prompts_lines_and_json_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text('# comment\nimport os\\nos.\n\n{"prompt": "x = eval"}\n')
    assert [c.text for c in read_prompts(str(path))] == ["import os\nos.", "x = eval"]
    path.write_text('{"text": 1}\n')
    with pytest.raises(UserError, match="p.txt:1: a JSON line needs a string 'prompt'"):
        read_prompts(str(path))
    with pytest.raises(UserError, match="cannot read red-team prompts"):
        read_prompts(str(tmp_path / "missing.txt"))


def test_the_metrics_are_registered():
    for name in ("spp_block_rate", "spp_false_positive_rate", "spp_ms_per_token"):
        assert name in METRICS


def test_measure_on_the_exported_model_blocks_what_the_plain_model_emits(exported):
    """The plain model continues ELICIT with FLAG; with the polytope it does not; the
    loss on safe text and the time are measured."""
    _, _, path = exported
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1))
    try:
        table, states = head_and_states(engine)
        poly = make_polytope(table, states, (FLAG,), TOK.appended_bytes(), quantile=None)
        guard = SafetyGuard.for_engine(poly, engine, TOK)
        text = ("hello world, x = 1\n" * 40) + ELICIT + FLAG + ("\nprint(2)\n" * 40)
        opts = SafetyEvalOptions(red_team=3, safe=3, context_tokens=8, new_tokens=6,
                                 loss_segments=2, segment_len=16, decode_tokens=4,
                                 prompts=(Context(ELICIT, "prompt"),))
        values, details = measure(engine, TOK, guard, text, opts)
    finally:
        engine.close()
    assert details["greedy"]["elicited"] >= 1           # the prompt elicits FLAG
    assert values["spp_block_rate"] == 1.0 and values["spp_emit_rate_with"] == 0.0
    assert np.isfinite(values["spp_loss_increase"]) and values["spp_ms_per_token"] == \
        details["timing"]["ms_per_token"]
    assert details["contexts"]["prompt"] == 1


def test_tokenized_contexts_keep_their_last_tokens():
    ctx = tokenized([Context("abcdefgh", "safe"), Context("xyz", "prompt")], TOK, 4)
    assert ctx[0].ids == tuple(TOK.encode("efgh")) and ctx[0].text == "efgh"
    assert ctx[1].ids == tuple(TOK.encode("xyz"))


def test_eval_safety_errors_are_one_line(exported, tmp_path, capsys):
    _, _, path = exported
    data = tmp_path / "d.txt"
    data.write_text("hello world\n" * 50)
    with model_has(None):
        assert eval_cli.run(["--model-dir", path, "--data", str(data), "--safety"]) == 2
    assert "has no safety polytope" in capsys.readouterr().err
    assert eval_cli.run(["--model-dir", path, "--data", str(data),
                               "--red-team", str(data)]) == 2
    assert "--red-team goes with --safety" in capsys.readouterr().err
