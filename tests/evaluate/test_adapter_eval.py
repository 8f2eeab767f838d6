"""perspective-eval --adapter: the adapter.* metrics are the loss adaptation minimises
(StreamedTarget.loss) without and with the adapter, equal to a plain cross-entropy
over the engine's logits; a zero adapter gains nothing; the metrics are
registered (gates may name them); bad input is one line before any work."""

import math

import jax
import numpy as np
import pytest

from perspective_jax.adapt.adapter_file import AdapterSpec, save_adapters
from perspective_jax.adapt.attach import attach_adapter
from perspective_jax.adapt.target import StreamedTarget
from perspective_jax.cli import eval as eval_cli
from perspective_jax.data.byte_tokenizer import ByteTokenizer
from perspective_jax.evaluate.adapter import measure
from perspective_jax.evaluate.gates import load_gates
from perspective_jax.evaluate.metrics import METRICS
from perspective_jax.evaluate.teacher_forced import segments
from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.options import EngineOptions
from perspective_jax.model.extensions import init_lora

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind. " * 2
SMALL = ["--segment-len", "8", "--max-segments", "4", "--decode-tokens", "4",
         "--host-budget-mb", "1"]


def _file(cfg, path, identity, b: float, scale: float = 1.0) -> str:
    lora = init_lora(cfg.model, jax.random.key(5), 2, init_scale=0.3)
    lora = jax.tree_util.tree_map_with_path(
        lambda p, a: np.full(a.shape, b, np.float32) if p[-1].key == "b" else a, lora)
    save_adapters(str(path), lora, identity, AdapterSpec(rank=2, scale=scale))
    return str(path)


@pytest.fixture(scope="module")
def setup(exported, tmp_path_factory):
    cfg, _, path = exported
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1, device_slots=2))
    tmp = tmp_path_factory.mktemp("adapter-eval")
    files = {"half": _file(cfg, tmp / "half.adapter", engine.identity, 0.5, scale=0.5),
             "zero": _file(cfg, tmp / "zero.adapter", engine.identity, 0.0)}
    windows = segments(ByteTokenizer().encode(TEXT), 8, 4)[1::2]      # the test split
    yield cfg, path, engine, files, windows
    engine.close()


def _cross_entropy(engine, windows, ext) -> float:
    """Mean −log p(next token) over every position, from the engine's logits."""
    total = []
    for row in windows:
        logits, _ = engine.forward(row[:-1], engine.new_state(), ext, all_logits=True)
        z = np.asarray(logits, np.float64)
        lse = z.max(1) + np.log(np.exp(z - z.max(1, keepdims=True)).sum(1))
        total += list(lse - z[np.arange(len(row) - 1), row[1:]])
    return float(np.mean(total))


def test_adapter_metrics_are_streamed_target_losses(setup):
    _, _, engine, files, windows = setup
    values = measure(engine, files["half"], windows)
    assert set(values) == {"adapter.loss_base", "adapter.loss", "adapter.loss_gain",
                           "adapter.rank"} <= set(METRICS)
    att = attach_adapter(engine, files["half"])                  # no coordinates: no change
    target = StreamedTarget(engine, att.spec.scale)
    assert values["adapter.loss"] == target.loss(windows, att.lora)
    assert values["adapter.loss_base"] == target.loss(windows, None)
    assert values["adapter.loss"] == pytest.approx(
        _cross_entropy(engine, windows, att.extensions()), abs=1e-5)
    assert values["adapter.loss_base"] == pytest.approx(
        _cross_entropy(engine, windows, None), abs=1e-5)
    assert values["adapter.loss_gain"] == values["adapter.loss_base"] - values["adapter.loss"]
    assert abs(values["adapter.loss_gain"]) > 1e-4                 # the adapter acts
    assert values["adapter.rank"] == 2.0 and math.isfinite(values["adapter.loss"])


def test_a_zero_adapter_gains_nothing(setup):
    _, _, engine, files, windows = setup
    values = measure(engine, files["zero"], windows)
    assert abs(values["adapter.loss_gain"]) <= 1e-6


def test_gates_may_name_the_adapter_metrics(tmp_path):
    path = tmp_path / "gates.yaml"
    path.write_text("gates:\n  - {metric: adapter.loss_gain, op: '>=', threshold: 0.0}\n")
    assert len(load_gates(str(path))) == 1


def test_eval_adapter_input_errors_are_one_line(setup, tmp_path, capsys):
    cfg, path, _, _, _ = setup
    data = tmp_path / "held_out.txt"
    data.write_text(TEXT)
    other = _file(cfg, tmp_path / "other.adapter", "another-model", 0.5)
    for argv, message in (
            (["--adapter", other, "--lm-eval", "x"], "--data"),
            (["--data", str(data), "--adapter", other, *SMALL], "another model"),
            (["--data", str(data), "--adapter", str(tmp_path / "none.adapter"), *SMALL],
             "none.adapter")):
        assert eval_cli.run(["--model-dir", path, *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_eval_cli_reports_the_adapter_metrics(setup, tmp_path, capsys):
    import json
    _, path, engine, files, _ = setup
    data = tmp_path / "held_out.txt"
    data.write_text(TEXT)
    assert eval_cli.run(["--model-dir", path, "--data", str(data), "--adapter",
                         files["half"], "--json", "--no-persistent", *SMALL]) == 0
    doc = json.loads(capsys.readouterr().out)
    windows = segments(ByteTokenizer().encode(TEXT), 8, 4)[1::2]
    want = measure(engine, files["half"], windows)
    for name, value in want.items():
        assert doc["metrics"][name] == pytest.approx(value, abs=1e-6), name
    assert doc["metrics"]["adapter.loss_base"] == pytest.approx(doc["metrics"]["val_loss"],
                                                                abs=1e-4)
