"""One writer per run directory (`rundir.lock`): refusal naming the holder, takeover
of a dead holder's lock, shared readers, re-entry, and the CLIs that hold it."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, train_overrides

from perspective_jax.errors import UserError
from perspective_jax.rundir.lock import hold_output_dir, hold_run_dir, lock_path

HOLD = """
import sys, time
from perspective_jax.rundir.lock import hold_output_dir, hold_run_dir
path, mode = sys.argv[1:]
with hold_output_dir(path) if mode == "out" else hold_run_dir(path, mode == "shared"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder():
    """Start a process that holds a directory's lock (exclusive or shared)."""
    procs = []

    def start(directory, mode="exclusive"):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory), mode],
                                stdout=subprocess.PIPE, text=True, env=env)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def refusal(directory, shared=False):
    with pytest.raises(UserError) as info:
        with hold_run_dir(str(directory), shared=shared):
            pass
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_ones_lock_is_taken(
        tmp_path, holder):
    proc = holder(tmp_path)
    message = refusal(tmp_path)
    assert f"is in use by PID {proc.pid} (" in message and ", since 20" in message
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stale = json.loads(open(lock_path(tmp_path)).read())
    assert stale["pid"] == proc.pid                   # the dead holder's name is left
    with hold_run_dir(str(tmp_path)):                 # ... and its lock is taken over
        assert json.loads(open(lock_path(tmp_path)).read())["pid"] == os.getpid()
    assert not os.path.exists(lock_path(tmp_path))    # released: the file is gone


def test_a_dead_holders_name_is_never_shown(tmp_path):
    """A lock taken by a process that has not written its name (yet), over the name a
    dead process left: the refusal names the live holder, not the dead PID."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(lock_path(tmp_path), "w") as fh:
        json.dump({"pid": dead.pid, "host": os.uname().nodename, "command": "x"}, fh)
    script = ("import fcntl, os, sys, time\n"
              "fd = os.open(sys.argv[1], os.O_RDWR)\n"
              "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, lock_path(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        message = refusal(tmp_path)
        assert f"in use by PID {proc.pid}" in message and str(dead.pid) not in message
    finally:
        proc.kill()
        proc.wait()


def test_readers_share_and_exclude_writers(tmp_path, holder):
    reader = holder(tmp_path, "shared")
    with hold_run_dir(str(tmp_path), shared=True):    # a second reader is welcome
        pass
    assert os.path.exists(lock_path(tmp_path))        # not removed under the other reader
    assert f"in use by PID {reader.pid}" in refusal(tmp_path)
    reader.kill()
    reader.wait()
    writer = holder(tmp_path)
    assert f"is being written by PID {writer.pid}" in refusal(tmp_path, shared=True)


def test_a_process_reenters_its_own_lock(tmp_path):
    with hold_run_dir(str(tmp_path)):
        with hold_run_dir(str(tmp_path)):
            pass
        assert os.path.exists(lock_path(tmp_path))    # still held by the outer one
    assert not os.path.exists(lock_path(tmp_path))


def test_output_lock_sits_beside_the_directory(tmp_path, holder):
    """A directory renamed into place as a whole (a model directory) is locked
    through OUT.lock beside it; a missing parent is left to the writer to report."""
    out = tmp_path / "model"
    proc = holder(out, "out")
    assert os.path.exists(str(out) + ".lock") and not out.exists()
    with pytest.raises(UserError, match=f"--out {out} is in use by PID {proc.pid}"):
        with hold_output_dir(str(out)):
            pass
    with hold_output_dir(str(tmp_path / "missing" / "model")):
        pass


def test_train_and_export_clis_are_refused_in_one_line(tmp_path, holder, capsys):
    """The CLIs hold the locks: a trainer on a held run directory (or curriculum
    root), and an exporter reading a run being written, stop at once with exit 2."""
    from perspective_jax.cli.export import run as export
    from perspective_jax.cli.train import run as train
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = holder(run_dir)
    for stage in ("dense", "all"):
        assert train(["--stage", stage, "--run-dir", str(run_dir), "--no-progress",
                      *train_overrides()]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and f"PID {proc.pid}" in err
    t0 = time.time()
    assert export(["--run-dir", str(run_dir), "--out", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"being written by PID {proc.pid}" in err and "\n" not in err
    assert time.time() - t0 < 5
