"""perspective-eval's gates and metric registry: parsing (every malformed case is one
clear error naming the file and entry), checking, and the printed rows."""

import math

import pytest

from perspective_jax.errors import UserError
from perspective_jax.evaluate.gates import Gate, check, load_gates, parse_gates
from perspective_jax.evaluate.metrics import METRICS, register
from perspective_jax.evaluate.report import metric_rows, text_table


def _file(tmp_path, text):
    path = tmp_path / "gates.yaml"
    path.write_text(text)
    return str(path)


def test_gates_parse_and_check(tmp_path):
    path = _file(tmp_path, 'gates:\n  - {metric: ece.temperature, op: "<=", threshold: 0.08}\n'
                           '  - {metric: mpd.decode_ratio, op: ">=", threshold: 2}\n'
                           '  - {metric: accuracy, op: ">", threshold: 0.5}\n')
    gates = load_gates(path)
    assert gates == [Gate("ece.temperature", "<=", 0.08), Gate("mpd.decode_ratio", ">=", 2.0),
                     Gate("accuracy", ">", 0.5)]
    verdicts = check(gates, {"ece.temperature": 0.08, "mpd.decode_ratio": 1.9})
    assert [v.passed for v in verdicts] == [True, False, False]     # boundary, below, missing
    assert verdicts[2].value is None
    assert not check([Gate("accuracy", ">", 0.5)], {"accuracy": math.nan})[0].passed
    rows = metric_rows({"ece.temperature": 0.08, "mpd.decode_ratio": 1.9}, verdicts)
    assert ("ece.temperature", "0.08", "", "<= 0.08", "PASS") in rows
    assert ("accuracy", "—", "", "> 0.5", "FAIL") in rows
    assert "FAIL" in text_table(rows)


@pytest.mark.parametrize("text, match", [
    ("gates: [", "malformed YAML"),
    ("- {metric: accuracy}", "top-level key 'gates:'"),
    ("gates: []", "non-empty list"),
    ("gates: [accuracy]", "gate 1: expected a mapping"),
    ("gates:\n  - {metric: acuracy, op: '>', threshold: 1}", "unknown metric 'acuracy'"),
    ("gates:\n  - {metric: accuracy, op: '=>', threshold: 1}", "unknown comparison '=>'"),
    ("gates:\n  - {metric: accuracy, op: '>'}", "missing key 'threshold'"),
    ("gates:\n  - {metric: accuracy, op: '>', threshold: 1, when: now}", "unknown key 'when'"),
    ("gates:\n  - {metric: accuracy, op: '>', threshold: high}", "finite number"),
    ("gates:\n  - {metric: accuracy, op: '>', threshold: .nan}", "finite number"),
    ("gates:\n  - {metric: accuracy, op: '>', threshold: true}", "finite number"),
])
def test_malformed_gates_are_one_line_errors(tmp_path, text, match):
    with pytest.raises(UserError, match=match) as err:
        load_gates(_file(tmp_path, text))
    assert "\n" not in str(err.value) and "gates.yaml" in str(err.value)


def test_missing_gates_file_and_directory(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_gates(str(tmp_path / "none.yaml"))
    with pytest.raises(UserError, match="is a directory"):
        load_gates(str(tmp_path))


def test_registry_is_extensible_and_names_are_unique():
    metric = register("test.only_metric", "", "lower", "a later capability's metric")
    try:
        assert parse_gates({"gates": [{"metric": "test.only_metric", "op": "<",
                                       "threshold": 1}]}, "x")[0].metric == metric.name
        with pytest.raises(ValueError, match="twice"):
            register("test.only_metric", "", "lower", "again")
    finally:
        del METRICS["test.only_metric"]
    with pytest.raises(ValueError, match="better"):
        register("test.bad_direction", "", "up", "")
    METRICS.pop("test.bad_direction", None)
