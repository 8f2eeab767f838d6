"""perspective-train: wrong --init-from / --run-dir, finished and corrupt runs.

Source and finished runs are faked (a config.yaml, a tiny checkpoint, a metrics
line) so no test trains or compiles a model.
"""

import json
import os
import pathlib

import numpy as np
import pytest
from conftest import train_overrides

from perspective_jax.cli.train import run
from perspective_jax.config import load_config, save_config
from perspective_jax.errors import UserError
from perspective_jax.rundir.checkpoint import Checkpointer, restore_params
from perspective_jax.train.stages import stage_config


def cli(stage, run_dir, *flags, **overrides):
    overrides = {"train.steps": 4, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return ["--stage", stage, "--run-dir", str(run_dir), "--no-progress", *flags,
            *train_overrides(**overrides)]


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


def fake_run(path, stage, step=None, **overrides):
    """A run directory of `stage` holding its config.yaml (and a checkpoint at `step`
    plus the eval record training would have logged there)."""
    cfg = stage_config(load_config(None, train_overrides(**overrides)), stage)
    os.makedirs(path, exist_ok=True)
    save_config(cfg, os.path.join(path, "config.yaml"))
    if step is not None:
        ckpt = Checkpointer(str(path), cfg.checkpoint)
        ckpt.save(step, {"step": np.int32(step)}, None, {}, force=True)
        ckpt.close()
        record = {"step": step, "kind": "eval", "val_loss": 1.25, "val_bits_per_char": 2.5,
                  "sample": "hello"}
        pathlib.Path(path, "metrics.jsonl").write_text(json.dumps(record) + "\n")
    return cfg


def test_init_from_with_stage_all_is_refused(tmp_path, capsys):
    assert run(cli("all", tmp_path / "cur", "--init-from", str(tmp_path))) == 2
    assert "--init-from cannot be used with --stage all" in one_line_error(capsys)
    assert not (tmp_path / "cur").exists()


@pytest.mark.parametrize("stage", ["sparse", "ternary"])
def test_routed_stage_from_a_dense_run_names_the_stage_found(tmp_path, capsys, stage):
    fake_run(tmp_path / "dense", "dense")
    assert run(cli(stage, tmp_path / "r", "--init-from", str(tmp_path / "dense"))) == 2
    err = one_line_error(capsys)
    assert f"--stage {stage} must be initialised from" in err and "dense model" in err


def test_init_from_a_run_of_another_shape(tmp_path, capsys):
    fake_run(tmp_path / "up", "upcycle")
    assert run(cli("sparse", tmp_path / "r", "--init-from", str(tmp_path / "up"),
                   model__d_model=48)) == 2
    assert "another shape (model.d_model: 32 -> 48)" in one_line_error(capsys)
    # the failed attempt left no checkpoint: without --init-from it must not start afresh
    assert run(cli("sparse", tmp_path / "r")) == 2
    assert "needs --init-from UPCYCLE_RUN_DIR" in one_line_error(capsys)


def test_init_from_a_missing_directory(tmp_path, capsys):
    assert run(cli("sparse", tmp_path / "r", "--init-from", str(tmp_path / "nope"))) == 2
    assert "no such directory" in one_line_error(capsys)


def test_rerunning_a_finished_run_trains_nothing_and_reports_no_nan(tmp_path, capsys):
    fake_run(tmp_path / "r", "dense", step=4, **{"train.steps": 4})
    for steps in (4, 3):
        assert run(cli("dense", tmp_path / "r", train__steps=steps)) == 0
        out, err = capsys.readouterr()
        assert f"already at step 4 (train.steps={steps}), nothing to train" in out
        assert "nan" not in out and "val loss 1.2500" in out and not err
    # the record of what was trained is kept: a lower train.steps is not saved
    assert load_config(str(tmp_path / "r" / "config.yaml")).train.steps == 4


@pytest.mark.parametrize("make", ["file", "under_file", "proc"])
def test_unusable_run_dir(tmp_path, capsys, make):
    (tmp_path / "afile").write_text("x")
    path = {"file": tmp_path / "afile", "under_file": tmp_path / "afile" / "sub",
            "proc": pathlib.Path("/proc/no-such-run")}[make]
    if make == "proc" and not os.path.isdir("/proc"):
        pytest.skip("no /proc")
    assert run(cli("dense", path)) == 2
    assert f"--run-dir {path}" in one_line_error(capsys)


def corrupt_latest(run_dir, step):
    for root, _, files in os.walk(os.path.join(run_dir, "checkpoints", str(step), "state")):
        for name in files:
            if os.sep + "d" in root:                    # the array data files
                path = os.path.join(root, name)
                with open(path, "wb") as fh:
                    fh.write(os.urandom(max(os.path.getsize(path), 64)))


def test_corrupt_checkpoint_is_one_line_error(tmp_path, capfd):
    """Resume and --init-from from damaged array files: one error naming the step
    directory and what to do; orbax's own error logs stay quiet."""
    import jax.numpy as jnp

    from perspective_jax.config import CheckpointConfig
    state = {"params": {"w": jnp.arange(64, dtype=jnp.float32)}, "step": jnp.int32(0)}
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig(every=1, keep=5, async_save=False))
    for step in (1, 2):
        ckpt.save(step, state, None, {})
    ckpt.wait()
    corrupt_latest(tmp_path, 2)
    with pytest.raises(UserError) as err:
        ckpt.restore(2, state)
    msg = str(err.value)
    assert "step 2" in msg and str(tmp_path / "checkpoints" / "2") in msg
    assert "re-run with --resume-from-step 1" in msg and "\n" not in msg
    ckpt.close()
    with pytest.raises(UserError, match="^--init-from .*is damaged"):
        restore_params(str(tmp_path), state["params"])
    assert "Traceback" not in capfd.readouterr().err


def test_latest_complete_step_ignores_a_checkpoint_still_being_written(tmp_path):
    from perspective_jax.rundir.checkpoint import latest_complete_step
    assert latest_complete_step(str(tmp_path)) is None                 # no checkpoints/
    for name in ("3", "12", "20.orbax-checkpoint-tmp-1700000000", "notes", "25"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    for name in ("3", "12"):                     # 25 finished saving but was never listed
        (tmp_path / "checkpoints" / name / "checksums.json").write_text("{}")
    assert latest_complete_step(str(tmp_path)) == 12
