"""perspective-eval end to end on a small exported model: a passing gate file exits 0
and writes the report files, a failing gate exits 1 naming it, bad input (unknown
metric, malformed gates, empty or too little data, missing flags) is one line, exit 2,
before any work; perspective-infer --mpd --show-confidence streams JSON Lines."""

import json
import os

import pytest

from perspective_jax.cli import eval as eval_cli
from perspective_jax.cli import infer

SMALL = ["--segment-len", "8", "--max-segments", "4", "--decode-tokens", "4",
         "--host-budget-mb", "1"]


def _one_line(capsys, message):
    out, err = capsys.readouterr()
    assert message in err, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "held_out.txt"
    path.write_text("To be, or not to be, that is the question: whether 'tis nobler. " * 3)
    return str(path)


def _gates(tmp_path, *gates):
    path = tmp_path / "gates.yaml"
    path.write_text("gates:\n" + "".join(
        f"  - {{metric: {m}, op: '{op}', threshold: {t}}}\n" for m, op, t in gates))
    return str(path)


@pytest.mark.slow
def test_eval_passes_fails_and_writes_the_report(exported_distinct, tmp_path, text, capsys,
                                                 monkeypatch):
    from perspective_jax.evaluate import run as eval_run
    _, _, model = exported_distinct
    out = tmp_path / "report"
    ok = _gates(tmp_path, ("ece.temperature", "<=", 1.0), ("decode_tok_per_s", ">", 0))
    results = []
    real = eval_run.evaluate_model
    monkeypatch.setattr(eval_run, "evaluate_model",
                        lambda *a, **k: results.append(real(*a, **k)) or results[-1])
    assert eval_cli.run(["--model-dir", model, "--data", text, "--gates", ok, "--out",
                         str(out), "--no-persistent", *SMALL]) == 0   # persistent: scored in
    #                                                  test_teacher_forced (compiles halved)
    printed, err = capsys.readouterr()
    assert "PASS" in printed and "FAIL" not in printed and "all 2 gates passed" in err
    for name in ("report.json", "report.md", "reliability.png", "risk_coverage.png"):
        assert os.path.getsize(out / name) > 0, name
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and set(report["metrics"]) >= {
        "val_loss", "bits_per_byte", "ece.softmax", "ece.mpd_triggered", "auroc.temperature",
        "decode_tok_per_s", "decode_tok_per_s_mpd", "peak_host_bytes", "device_bytes"}
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ece.mpd_agreement_persistent" not in report["metrics"]       # --no-persistent
    # the same measurements against a gate that fails (not measured again: the
    # evaluation above is the one under test; here the verdict and the exit code)
    monkeypatch.setattr(eval_run, "evaluate_model", lambda *a, **k: results[0])
    bad = _gates(tmp_path, ("ece.temperature", "<=", 1.0), ("val_loss", "<", 0.001))
    assert eval_cli.run(["--model-dir", model, "--data", text, "--gates", bad, "--json",
                         *SMALL]) == 1
    printed, err = capsys.readouterr()
    doc = json.loads(printed)
    assert [g["passed"] for g in doc["gates"]] == [True, False] and not doc["passed"]
    assert "1 of 2 gates failed: val_loss < 0.001" in err
    assert doc["metrics"]["val_loss"] == results[0].values["val_loss"]


def test_eval_input_errors_are_one_line_before_any_work(exported, tmp_path, text, capsys):
    _, _, model = exported
    unknown = _gates(tmp_path, ("ece.mpd", "<=", 0.08))
    assert eval_cli.run(["--model-dir", model, "--data", text, "--gates", unknown]) == 2
    _one_line(capsys, "unknown metric 'ece.mpd'")
    (tmp_path / "broken.yaml").write_text("gates: [{metric: accuracy, op: '>'")
    assert eval_cli.run(["--model-dir", model, "--data", text, "--gates",
                         str(tmp_path / "broken.yaml")]) == 2
    _one_line(capsys, "malformed YAML")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert eval_cli.run(["--model-dir", model, "--data", str(empty), *SMALL]) == 2
    _one_line(capsys, "corpus is empty")
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    assert eval_cli.run(["--model-dir", model, "--data", str(short), *SMALL]) == 2
    _one_line(capsys, "needs at least 9")
    assert eval_cli.run(["--model-dir", model]) == 2
    _one_line(capsys, "--model-dir and --data are required")
    assert eval_cli.run(["--model-dir", str(tmp_path), "--data", text]) == 2
    _one_line(capsys, "manifest")
    assert eval_cli.run(["--model-dir", model, "--data", text, "--mpd-tau", "0"]) == 2
    _one_line(capsys, "--mpd-tau")


def test_list_metrics(capsys):
    assert eval_cli.run(["--list-metrics"]) == 0
    out = capsys.readouterr().out
    assert "ece.mpd_triggered" in out and "decode_tok_per_s_mpd" in out


def test_infer_show_confidence_streams_json_lines(exported_distinct, capsys):
    _, _, model = exported_distinct
    assert infer.run(["--model-dir", model, "To be", "--max-tokens", "5", "--temperature",
                      "0", "--mpd", "--mpd-every-k", "2", "--mpd-max-rate", "1", "--show-confidence",
                      "--host-budget-mb", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 5
    assert [r["mpd"] for r in rows][::2] == [True, True, True]
    assert all(0 <= r["confidence"] <= 1 and r["decision"] in ("p0", "vote", "uncertain")
               for r in rows)
    assert infer.run(["--model-dir", model, "x", "--show-confidence"]) == 2
    _one_line(capsys, "--show-confidence needs --mpd")
