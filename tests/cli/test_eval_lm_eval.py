"""perspective-eval --lm-eval: lm-evaluation-harness tasks in process on a small
exported model, alone or beside --data; their metrics in the table, the JSON and the
report ("lm_eval"); bad task names, flags, and a missing lm_eval are one line, exit 2;
`lm_eval` itself runs the "perspective" model through a Python one-liner."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from perspective_jax.cli import eval as eval_cli  # noqa: E402

PARAGRAPHS = ["To be, or not to", "be, that is the ", "question: whethe"]
ENGINE = ["--host-budget-mb", "1"]


def _one_line(capsys, message):
    out, err = capsys.readouterr()
    assert message in err, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture
def my_task(repo, tmp_path, monkeypatch):
    """A task directory holding `my_perplexity`: the example task, on a file of ours
    (the way docs/examples/lm_eval/perplexity_local.yaml says to point it elsewhere)."""
    import datasets
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    text = tmp_path / "mine.txt"
    text.write_text("\n\n".join(PARAGRAPHS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text(
        f"include: {repo / 'docs/examples/lm_eval/perplexity_local.yaml'}\n"
        "task: my_perplexity\n"
        f"dataset_kwargs:\n  data_files: {{test: {text}}}\n  sample_by: paragraph\n")
    return str(tasks)


def _bits_per_byte(model_dir, paragraphs):
    """Σ −log2 p over the paragraphs' bytes / their bytes, by the harness model."""
    from perspective_jax.evaluate.lm_eval_model import PerspectiveHarnessLM
    lm = PerspectiveHarnessLM(model_dir=model_dir, host_budget_mb=1)
    try:
        ll = sum(lm.rolling(p) for p in paragraphs)
    finally:
        lm.close()
    return -ll / sum(len(p.encode()) for p in paragraphs) / math.log(2)


def test_lm_eval_alone_prints_and_reports_the_task_metrics(exported, my_task, tmp_path,
                                                           capsys):
    model = exported[2]
    out = tmp_path / "report"
    assert eval_cli.run(["--model-dir", model, "--lm-eval", "my_perplexity",
                         "--lm-eval-include", my_task, "--out", str(out), *ENGINE]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["task", "metric", "value", "stderr"]
    assert {line.split()[1] for line in printed.splitlines()[2:]} == {
        "word_perplexity", "byte_perplexity", "bits_per_byte"}
    report = json.loads((out / "report.json").read_text())
    bpb = report["lm_eval"]["my_perplexity"]["bits_per_byte"]["value"]
    assert bpb == pytest.approx(_bits_per_byte(model, PARAGRAPHS), rel=1e-6)
    assert report["metrics"] == {} and sorted(os.listdir(out)) == ["report.json", "report.md"]
    assert "## lm-evaluation-harness" in (out / "report.md").read_text()
    # --lm-eval-limit 1: the first paragraph only
    assert eval_cli.run(["--model-dir", model, "--lm-eval", "my_perplexity", "--json",
                         "--lm-eval-include", my_task, "--lm-eval-limit", "1", *ENGINE]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["lm_eval"]["my_perplexity"]["bits_per_byte"]["value"] == pytest.approx(
        _bits_per_byte(model, PARAGRAPHS[:1]), rel=1e-6)


def test_lm_eval_beside_data_joins_both_in_the_report(exported, my_task, tmp_path, capsys,
                                                      monkeypatch):
    """--data's evaluation (stubbed: tests/cli/test_eval_cli.py runs it) and the harness
    in one report."""
    from perspective_jax.evaluate import run as eval_run
    monkeypatch.setattr(eval_run, "evaluate_model", lambda *a, **k: eval_run.EvalResult(
        {"val_loss": 2.5}, {}, {}))
    data = tmp_path / "held_out.txt"
    data.write_text("some text")
    out = tmp_path / "report"
    assert eval_cli.run(["--model-dir", exported[2], "--data", str(data), "--lm-eval",
                         "my_perplexity", "--lm-eval-include", my_task, "--lm-eval-limit",
                         "1", "--out", str(out), *ENGINE]) == 0
    printed = capsys.readouterr().out
    assert "val_loss" in printed and "my_perplexity" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"] == {"val_loss": 2.5} and "my_perplexity" in report["lm_eval"]
    md = (out / "report.md").read_text()
    assert "| val_loss |" in md and "| my_perplexity | bits_per_byte |" in md


def test_lm_eval_input_errors_are_one_line(exported, my_task, tmp_path, capsys,
                                           monkeypatch):
    model = exported[2]
    for argv, message in (
            (["--lm-eval", " , "], "give task names"),
            (["--lm-eval", "my_perplexity", "--lm-eval-limit", "0"], "--lm-eval-limit"),
            (["--lm-eval-include", my_task, "--data", "x"], "go with --lm-eval"),
            (["--lm-eval", "my_perplexity", "--gates", "g.yaml"], "give --data"),
            (["--lm-eval", "x", "--lm-eval-include", str(tmp_path / "nowhere")],
             "no such directory")):
        assert eval_cli.run(["--model-dir", model, *argv]) == 2
        _one_line(capsys, message)
    # an unknown name: neither under --lm-eval-include nor among lm_eval's tasks
    assert eval_cli.run(["--model-dir", model, "--lm-eval", "my_perplexity,no_such_task",
                         "--lm-eval-include", my_task]) == 2
    _one_line(capsys, "unknown task 'no_such_task'")
    # lm_eval not installed: how to install it
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "perspective_jax.evaluate.lm_eval_model")
    assert eval_cli.run(["--model-dir", model, "--lm-eval", "my_perplexity"]) == 2
    _one_line(capsys, "pip install 'perspective-jax[eval]'")


@pytest.mark.slow
def test_lm_eval_cli_runs_the_perspective_model(exported, repo, tmp_path):
    """The one-liner of docs/evaluation.md: lm_eval's own command line, with the model
    registered first."""
    (tmp_path / "held_out.txt").write_text("\n\n".join(PARAGRAPHS))
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}
    proc = subprocess.run(
        [sys.executable, "-c", "import perspective_jax.evaluate.lm_eval_model, "
         "lm_eval.__main__ as m; m.cli_evaluate()", "--model", "perspective",
         "--model_args", f"model_dir={exported[2]},host_budget_mb=1",
         "--tasks", "perspective_perplexity",
         "--include_path", str(repo / "docs/examples/lm_eval"),
         "--output_path", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [path] = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "out") for f in files
              if f.startswith("results")]
    with open(path) as fh:
        got = json.load(fh)["results"]["perspective_perplexity"]["bits_per_byte,none"]
    assert np.isclose(got, _bits_per_byte(exported[2], PARAGRAPHS), rtol=1e-6)
