"""Training checkpoints: every file checked before a restore, a step complete only once
its checksum list is written, save failures stop the run in one line, and falling
back to an older step only when asked (--resume-from-step)."""

import json
import os
import re
import shutil
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import train_overrides

from perspective_jax.config import CheckpointConfig, load_config, save_config
from perspective_jax.errors import UserError
from perspective_jax.rundir.checkpoint import (Checkpointer, latest_complete_step,
                                               restore_params)

CFG = CheckpointConfig(every=1, keep=10, async_save=False)


def tiny_state(seed):
    key = jax.random.key(seed)
    return {"params": {"w": jax.random.normal(key, (16, 8)), "b": jnp.arange(8.0)},
            "step": jnp.int32(seed)}


def data_iter():
    """A checkpointable grain iterator (the Checkpointer saves any such one)."""
    return iter(grain.MapDataset.range(2048).shuffle(seed=0).batch(2).to_iter_dataset())


def saved(tmp_path, steps=(1, 2), async_save=False):
    """A run directory with checkpoints at `steps`; returns (states by step, iterator
    positions by step)."""
    states, positions = {}, {}
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig(every=1, keep=10,
                                                        async_save=async_save))
    it = data_iter()
    for step in steps:
        next(it)
        states[step], positions[step] = tiny_state(step), it.get_state()
        ckpt.save(step, states[step], it, {"note": f"step {step}"})
    ckpt.close()
    return states, positions


def step_dir(tmp_path, step):
    return tmp_path / "checkpoints" / str(step)


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def file_of_kind(step_path, kind):
    """One file of each kind a step holds: array data, array metadata, the grain
    iterator position, the meta JSON, orbax's step metadata."""
    files = sorted(p for p in step_path.rglob("*") if p.is_file())
    pick = {"array data": lambda p: "ocdbt.process_0" in p.parts and "d" in p.parts,
            "array metadata": lambda p: p.name == "_METADATA" and p.parent.name == "state",
            "iterator state": lambda p: p.parent.name == "data_iter" and p.suffix == ".json",
            "meta json": lambda p: p.parent.name == "meta" and p.name == "metadata",
            "step metadata": lambda p: p.name == "_CHECKPOINT_METADATA"}[kind]
    found = [p for p in files if pick(p)]
    assert found, (kind, files)
    return found[0]


@pytest.mark.parametrize("kind", ["array data", "array metadata", "iterator state",
                                  "meta json", "step metadata"])
def test_a_flipped_byte_in_each_file_kind_is_detected_and_named(tmp_path, kind):
    states, positions = saved(tmp_path)
    target = file_of_kind(step_dir(tmp_path, 2), kind)
    rel = target.relative_to(step_dir(tmp_path, 2)).as_posix()
    flip_byte(target)
    ckpt = Checkpointer(str(tmp_path), CFG)
    with pytest.raises(UserError) as err:
        ckpt.restore(2, states[2], data_iter())
    msg = str(err.value)
    assert "\n" not in msg and "step 2" in msg and f"{rel} does not match its checksum" in msg
    assert "--resume-from-step 1" in msg
    # the undamaged step still restores exactly, the iterator at its position
    it = data_iter()
    state, meta = ckpt.restore(1, states[1], it)
    ckpt.close()
    assert meta == {"note": "step 1"} and it.get_state() == positions[1]
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(states[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # --init-from and export read the latest step through restore_params: checked too
    with pytest.raises(UserError, match=rf"^--init-from {tmp_path}: .*step 2.*{rel} does not"):
        restore_params(str(tmp_path), states[2]["params"])


@pytest.mark.parametrize("damage, expect", [
    ("remove", "is missing"), ("extra", "is not in its checksums.json"),
    ("list", "its checksums.json is damaged")])
def test_missing_extra_files_and_a_damaged_list_are_named(tmp_path, damage, expect):
    states, _ = saved(tmp_path)
    path = step_dir(tmp_path, 2)
    if damage == "remove":
        file_of_kind(path, "meta json").unlink()
    elif damage == "extra":
        (path / "state" / "stray.bin").write_bytes(b"x")
    else:
        flip_byte(path / "checksums.json")
    ckpt = Checkpointer(str(tmp_path), CFG)
    with pytest.raises(UserError, match=f"step 2 .* is damaged: .*{expect}"):
        ckpt.restore(2, states[2])
    ckpt.close()


def test_a_step_finished_but_never_listed_is_adopted_by_the_next_trainer(tmp_path):
    """Killed between orbax's finalise and the list (or saved by an older version): a
    reader does not use the step, and a trainer opening the run lists it (saying so)
    and resumes from it — nothing is lost."""
    states, _ = saved(tmp_path, steps=(1, 2, 3))
    os.remove(step_dir(tmp_path, 3) / "checksums.json")
    assert latest_complete_step(str(tmp_path)) == 2
    params = restore_params(str(tmp_path), states[2]["params"])
    np.testing.assert_array_equal(np.asarray(params["w"]), np.asarray(states[2]["params"]["w"]))
    notes = []
    ckpt = Checkpointer(str(tmp_path), CFG, log=notes.append)
    assert ckpt.select_resume_step() == 3 and ckpt.latest_step() == 3
    assert len(notes) == 1 and "step(s) 3" in notes[0] and "listed them now" in notes[0]
    ckpt.close()
    assert latest_complete_step(str(tmp_path)) == 3
    params = restore_params(str(tmp_path), states[3]["params"])
    np.testing.assert_array_equal(np.asarray(params["w"]), np.asarray(states[3]["params"]["w"]))


def test_a_run_saved_before_the_lists_is_named_to_readers(tmp_path):
    states, _ = saved(tmp_path, steps=(1,))
    os.remove(step_dir(tmp_path, 1) / "checksums.json")
    with pytest.raises(UserError, match="no checksum lists .* re-run its perspective-train"):
        restore_params(str(tmp_path), states[1]["params"], source="--run-dir")


def test_async_saves_are_listed_once_finished_and_keep_counts_complete_steps(tmp_path):
    saved(tmp_path, steps=(1, 2, 3, 4), async_save=True)
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig(every=1, keep=2, async_save=True))
    ckpt.save(5, tiny_state(5), None, {})
    ckpt.wait()
    for step in (4, 5):
        body = json.loads((step_dir(tmp_path, step) / "checksums.json").read_text())
        assert body["step"] == step and "state/_METADATA" in body["files"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "5"]
    ckpt.close()


def test_resume_from_step_is_validated(tmp_path):
    saved(tmp_path, steps=(1, 2, 3))
    ckpt = Checkpointer(str(tmp_path), CFG)
    with pytest.raises(UserError, match=r"--resume-from-step 5: .* no complete checkpoint "
                                        r"at that step \(complete steps: 1, 2, 3\)"):
        ckpt.select_resume_step(5)
    flip_byte(file_of_kind(step_dir(tmp_path, 1), "array data"))
    with pytest.raises(UserError, match="step 1 .* is damaged"):
        ckpt.select_resume_step(1)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2", "3"]   # nothing moved
    ckpt.close()


@pytest.mark.parametrize("stage", ["all", "upcycle"])
def test_resume_from_step_needs_a_stage_that_trains(tmp_path, capsys, stage):
    from perspective_jax.cli.train import run
    assert run(["--stage", stage, "--run-dir", str(tmp_path / "r"), "--resume-from-step",
                "2", *train_overrides()]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --resume-from-step cannot be used with --stage {stage}")


def test_export_of_a_run_without_checkpoints_names_its_own_flag(tmp_path, capsys):
    from perspective_jax.cli.export import run as export
    from perspective_jax.data.tokenizer import load_or_train
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    save_config(load_config(None, train_overrides()), str(run_dir / "config.yaml"))
    load_or_train("byte", str(run_dir), 259, lambda: iter(()))
    assert export(["--run-dir", str(run_dir), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --run-dir {run_dir}: the run has no complete checkpoint")
    assert "--init-from" not in err and "\n" not in err


def test_save_failure_messages_name_the_path_and_the_bytes(tmp_path):
    """A tensorstore error carries no errno: a full disk is still told apart."""
    from perspective_jax.rundir.checkpoint_failure import OrbaxErrorLog, save_failed
    errors = OrbaxErrorLog()
    errors.remove()
    exc = ValueError('RESOURCE_EXHAUSTED: Error writing local file "x/_sharding": Failed '
                     'to write 177 bytes to file 14: No space left on device')
    msg = str(save_failed(str(tmp_path / "9"), exc, errors, 3 << 20, 6))
    assert msg.startswith(f"no space left on the device writing {tmp_path / '9'} "
                          "(needs 3.0 MB, ") and " free)" in msg
    assert msg.endswith("the last complete checkpoint (step 6) is intact")
    msg = str(save_failed(str(tmp_path / "9"), RuntimeError("odd"), errors, 0, None))
    assert "(odd)" in msg and "no checkpoint of this run is complete yet" in msg


def test_tracebacks_of_callbacks_into_a_closed_event_loop_are_held_back(capsys):
    """tensorstore prints them through sys.stderr, in pieces, after a failed save."""
    from perspective_jax.rundir.checkpoint_failure import OrbaxErrorLog
    errors = OrbaxErrorLog()
    try:
        for piece in ["step 3 ", "ok\n", "Traceback (most recent call last):\n",
                      '  File "base_events.py", line 806, in call_soon_threadsafe\n',
                      "RuntimeError", ": ", "Event loop is closed", "\n",
                      "Traceback (most recent call last):\n", '  File "x.py"\n',
                      "ValueError: a real one\n", "\r50%|##"]:
            sys.stderr.write(piece)
    finally:
        errors.remove()
    assert capsys.readouterr().err == ('step 3 ok\nTraceback (most recent call last):\n'
                                       '  File "x.py"\nValueError: a real one\n\r50%|##')
    assert errors.count == 1 and "Event loop is closed" in errors.texts[0]


FILL_DISK = """
import sys
import numpy as np
from perspective_jax.cli.common import cli_entry
from perspective_jax.config import CheckpointConfig
import grain
from perspective_jax.rundir.checkpoint import Checkpointer

@cli_entry
def main(argv):
    ckpt = Checkpointer(argv[0], CheckpointConfig(every=1, keep=100, async_save=True))
    it = iter(grain.MapDataset.range(2048).shuffle(seed=0).batch(2).to_iter_dataset())
    noise = np.random.default_rng(0).normal(size=65536).astype(np.float32)
    for step in range(1, 40):
        next(it)
        ckpt.save(step, {"w": noise + step}, it, {"step": step})
    ckpt.close()

sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_during_async_saves_is_one_line_and_keeps_the_last_step(tmp_path):
    """checkpoints/ on a 700 KB tmpfs (a private mount namespace): the save that runs
    out of space ends the process with one line naming the step directory and the
    bytes, and the step before it restores exactly."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no unprivileged mount namespace (unshare -rm) to make a small disk")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shell = ('mount -t tmpfs -o size=700k tmpfs "$1/checkpoints" || exit 99; '
             '"$2" -c "$3" "$1"; rc=$?; cp -r "$1/checkpoints" "$1/kept"; exit $rc')
    done = subprocess.run(["unshare", "-rm", "sh", "-c", shell, "sh", str(run_dir),
                           sys.executable, FILL_DISK], capture_output=True, text=True)
    if done.returncode == 99:
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    err = done.stderr.strip()
    assert done.returncode == 2 and err.count("\n") == 0, err
    step = int(err.split(str(run_dir / "checkpoints") + os.sep)[1].split(" ")[0])
    assert re.search(r"^error: no space left on the device writing \S+ \(needs [\d.]+ "
                     r"[KMG]?B, [\d.]+ [KMG]?B free\)", err), err
    assert f"the last complete checkpoint (step {step - 1}) is intact" in err, err
    kept = tmp_path / "kept"                     # the tmpfs is gone: its copy is read
    kept.mkdir()
    (run_dir / "kept").rename(kept / "checkpoints")
    assert latest_complete_step(str(kept)) == step - 1
    ckpt = Checkpointer(str(kept), CFG)
    restored, meta = ckpt.restore(step - 1, {"w": jax.ShapeDtypeStruct((65536,), jnp.float32)})
    ckpt.close()
    assert meta == {"step": step - 1}
    noise = np.random.default_rng(0).normal(size=65536).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(restored["w"]), noise + (step - 1))


# --- a real trainer -----------------------------------------------------------------

def unwritable(path):
    """Make directory `path` refuse new entries (root ignores modes: chattr +i);
    returns the undo, or None where neither works."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        return lambda: os.chmod(path, 0o755)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)],
                                                 capture_output=True).returncode == 0:
        return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)
    return None


def test_save_failure_stops_the_run_and_resume_from_step_falls_back(tmp_path, text_corpus,
                                                                    monkeypatch, capfd):
    """(1) checkpoints/ turns unwritable before the step-4 save: the run stops with one
    line and step 3 (the last complete) restores exactly; (2) a flipped byte in step 3
    is named on the next start; (3) --resume-from-step 2 moves step 3 aside, and
    training on from step 2 rebuilds steps 3 and 4 bit for bit."""
    from perspective_jax.cli.train import run
    from perspective_jax.model.transformer import abstract_params
    from perspective_jax.train import hooks, trainer
    from perspective_jax.train.metrics import read_metrics
    probe = tmp_path / "probe"
    probe.mkdir()
    undo = unwritable(probe)
    if undo is None:
        pytest.skip("cannot make a directory unwritable here (root without chattr)")
    undo()
    run_dir = tmp_path / "run"
    ov = train_overrides(**{"checkpoint.every": 1})          # train.steps=6
    argv = ["--stage", "dense", "--run-dir", str(run_dir), "--data", str(text_corpus),
            "--no-progress", *ov]
    seen, fault = {}, {"at": 4, "undo": None}
    real_save = hooks.save_checkpoint

    def spying_save(run_, loop, force):
        seen[loop.done] = jax.tree.map(np.asarray, loop.state["params"])
        if loop.done == fault["at"]:
            run_.ckpt.wait()                      # step 3 complete, then the fault
            fault["undo"] = unwritable(run_dir / "checkpoints")
        real_save(run_, loop, force)

    monkeypatch.setattr(hooks, "save_checkpoint", spying_save)
    for module in (hooks, trainer):              # evaluation is not under test: skip it
        monkeypatch.setattr(module, "log_evaluation", lambda run_, loop, step: 0.0)
    try:
        assert run(argv) == 2
    finally:
        if fault["undo"]:
            fault["undo"]()
    err = capfd.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith(f"error: cannot write {run_dir / 'checkpoints' / '4'}") and \
        "the last complete checkpoint (step 3) is intact" in err, err
    assert max(r["step"] for r in read_metrics(str(run_dir), "train")) <= 5   # it stopped
    assert latest_complete_step(str(run_dir)) == 3
    cfg = load_config(None, ov)
    restored = restore_params(str(run_dir), abstract_params(cfg.model))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(seen[3])):
        assert np.array_equal(np.asarray(a), b)

    flip_byte(file_of_kind(step_dir(run_dir, 3), "array data"))
    assert run(argv) == 2
    err = capfd.readouterr().err.strip()
    assert "step 3" in err and "does not match its checksum" in err and \
        "re-run with --resume-from-step 2" in err and "\n" not in err, err

    first, fault["at"] = dict(seen), None
    seen.clear()
    assert run([*argv, "--resume-from-step", "2"]) == 0
    err = capfd.readouterr().err
    assert "--resume-from-step 2: moved the later checkpoint step(s) 3 to" in err, err
    assert (run_dir / "checkpoints-set-aside" / "3" / "checksums.json").is_file()
    assert latest_complete_step(str(run_dir)) == 6
    for step in (3, 4):
        for a, b in zip(jax.tree.leaves(seen[step]), jax.tree.leaves(first[step])):
            assert np.array_equal(a, b), step
