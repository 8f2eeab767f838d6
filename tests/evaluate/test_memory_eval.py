"""perspective-eval --memory: the teacher-forced value scorer against one parallel
pass of the engine, the memory.* metrics on a small memory, and one-line errors."""

import math

import numpy as np
import pytest

from perspective_jax.cli import eval as eval_cli
from perspective_jax.cli import memory as memory_cli
from perspective_jax.data.byte_tokenizer import ByteTokenizer
from perspective_jax.evaluate.memory import measure, value_logprobs
from perspective_jax.evaluate.metrics import METRICS
from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.options import EngineOptions
from perspective_jax.memory.recall import RecallConfig

FACTS = [("the river otter eats", "smoked trout"), ("the lighthouse password", "gull-42"),
         ("the captain's parrot", "Admiral Squawk")]


@pytest.fixture(scope="module")
def engine_and_memory(exported, tmp_path_factory):
    _, _, path = exported
    out = str(tmp_path_factory.mktemp("mem") / "facts.hdm")
    for key, value in FACTS:
        assert memory_cli.run(["--memory", out, "--model-dir", path, "add", key, value]) == 0
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1, device_slots=2))
    yield engine, out
    engine.close()


def test_value_logprobs_equal_one_parallel_pass(engine_and_memory):
    engine, _ = engine_and_memory
    tok = ByteTokenizer()
    k, v = tok.encode("key: ").tolist(), tok.encode("value").tolist()
    got = value_logprobs(engine, k, v)
    logits, _ = engine.forward(np.asarray(k + v, np.int32), engine.new_state(),
                               all_logits=True)
    z = np.asarray(logits, np.float64)[len(k) - 1:-1]
    ref = [row[t] - row.max() - math.log(np.exp(row - row.max()).sum())
           for row, t in zip(z, v)]
    np.testing.assert_allclose(got, ref, atol=2e-4)


def test_memory_metrics(engine_and_memory):
    engine, path = engine_and_memory
    tok = ByteTokenizer()
    contexts = [tok.encode(t).tolist() for t in ("import os, sys", "def main(argv):",
                                                  "for i in range(10):", "return None")]
    values = measure(engine, tok, path, RecallConfig(), contexts, n=8)
    assert set(values) <= set(METRICS) and len(values) == 6
    assert values["memory.recall_accuracy"] == 1.0          # exact keys
    assert 0.0 <= values["memory.false_hit_rate"] <= 1.0
    assert values["memory.value_prob_injected"] > values["memory.value_prob"]
    assert values["memory.value_prob_gain"] == pytest.approx(
        values["memory.value_prob_injected"] / values["memory.value_prob"])
    assert values["memory.query_us"] > 0


def test_memory_needs_data(engine_and_memory, exported, capsys):
    _, path = engine_and_memory
    _, _, model = exported
    assert eval_cli.run(["--model-dir", model, "--memory", path, "--lm-eval", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--data" in err and "\n" not in err
