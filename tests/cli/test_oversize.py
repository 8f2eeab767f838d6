"""Absurd sizes are refused up front — before a run directory, a tokenizer or a compile —
in one line with the numbers and exit 2; --allow-oversize lets a config proceed."""

import math
import os
import time

import jax
import pytest

from conftest import train_overrides
from perspective_jax.cli import export as export_cli
from perspective_jax.cli import infer as infer_cli
from perspective_jax.cli import train as train_cli
from perspective_jax.config import load_config
from perspective_jax.modeldir.format import SHARED_FILE
from perspective_jax.model import footprint
from perspective_jax.model.census import human_bytes
from perspective_jax.model.transformer import abstract_params
from perspective_jax.train import stages

TINY_HOST = footprint.Machine(host_bytes=900)


class Reached(Exception):
    """Raised by a stub standing in for the expensive part a refusal must precede."""


@pytest.fixture
def no_training(monkeypatch):
    def stub(*args, **kwargs):
        raise Reached("run_stage")
    monkeypatch.setattr(stages, "run_stage", stub)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("override,part", [
    ("model.d_model=1000000000", "params"), ("model.vocab_size=10000000", "logits"),
    ("train.batch_size=1000000", "activations"), ("model.n_layers=1000000", "params")])
def test_train_refuses_absurd_sizes_before_any_work(tmp_path, capsys, no_training,
                                                    override, part):
    run_dir = tmp_path / "run"
    t0 = time.perf_counter()
    rc = train_cli.run(["--stage", "all", "--run-dir", str(run_dir),
                        "--config", "curricula/tiny.yaml", override])
    elapsed = time.perf_counter() - t0
    err = _error_line(capsys)
    assert rc == 2 and elapsed < 5, (rc, elapsed)
    assert err.startswith("error: perspective-train --stage dense ")   # the first stage
    assert " needs ~" in err and "of host memory (" in err
    assert f"{part} " in err and "this machine has" in err and "--allow-oversize" in err
    assert not run_dir.exists()                       # nothing was created


def test_train_params_figure_matches_the_model_tree(tmp_path, capsys, no_training):
    """A 10M vocabulary: the refusal's params figure is the real tree's float32 bytes
    (a copy per CPU device: the data-parallel mesh replicates them)."""
    override = "model.vocab_size=10000000"
    cfg = load_config("curricula/tiny.yaml", [override])
    ref = 4 * sum(math.prod(a.shape) for a in jax.tree.leaves(abstract_params(cfg.model)))
    ref *= len(jax.local_devices())
    train_cli.run(["--stage", "dense", "--run-dir", str(tmp_path / "r"),
                   "--config", "curricula/tiny.yaml", override])
    assert f"(params {human_bytes(ref)}, " in _error_line(capsys)


def test_tiny_config_passes_and_override_proceeds(tmp_path, capsys, monkeypatch, no_training):
    argv = ["--stage", "dense", "--run-dir", str(tmp_path / "r"), *train_overrides()]
    with pytest.raises(Reached):                      # the real machine holds a tiny run
        train_cli.run(argv)
    monkeypatch.setattr(footprint, "probe_machine", lambda: TINY_HOST)
    assert train_cli.run(argv) == 2
    assert "this machine has 900 B of host memory available" in _error_line(capsys)
    with pytest.raises(Reached):
        train_cli.run([*argv, "--allow-oversize"])


def test_every_stage_is_checked_also_when_started_from_another(tmp_path, capsys, monkeypatch,
                                                              no_training):
    monkeypatch.setattr(footprint, "probe_machine", lambda: TINY_HOST)
    for stage in ("sparse", "ternary", "align"):
        rc = train_cli.run(["--stage", stage, "--run-dir", str(tmp_path / stage),
                            "--init-from", str(tmp_path / "prev"), *train_overrides()])
        assert rc == 2 and f"perspective-train --stage {stage} " in _error_line(capsys)


def test_export_refuses_before_reading_checkpoints(tmp_path, capsys):
    from perspective_jax.rundir.layout import save_run_config
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_run_config(load_config("curricula/tiny.yaml", ["model.vocab_size=2000000000"]),
                    str(run))
    out = tmp_path / "model"
    assert export_cli.run(["--run-dir", str(run), "--out", str(out)]) == 2
    err = _error_line(capsys)
    assert "perspective-export needs ~" in err and "(params 1.02 TB, " in err
    assert not out.exists()


def test_infer_refuses_then_override_reaches_the_engine(exported, capsys, monkeypatch):
    _, _, model_dir = exported
    import perspective_jax.infer.engine as engine

    def stub(*args, **kwargs):
        raise Reached("engine")
    monkeypatch.setattr(engine, "StreamingEngine", stub)
    monkeypatch.setattr(footprint, "probe_machine", lambda: TINY_HOST)
    argv = ["--model-dir", model_dir, "hello"]
    assert infer_cli.run(argv) == 2
    shared = os.path.getsize(os.path.join(model_dir, SHARED_FILE))
    err = _error_line(capsys)
    assert "perspective-infer needs ~" in err
    assert f"shared weights read {human_bytes(shared)}" in err
    with pytest.raises(Reached):
        infer_cli.run([*argv, "--allow-oversize"])


def test_dimension_guard_is_not_overridable(tmp_path, capsys, no_training):
    rc = train_cli.run(["--stage", "dense", "--run-dir", str(tmp_path / "r"),
                        "--allow-oversize", "model.vocab_size=3000000000"])
    assert rc == 2 and "the longest axis JAX can index" in _error_line(capsys)

