"""`perspective-train` under signals and a second writer: exit 130 promptly with one
line at any moment, a checkpoint from inside the loop, never a segfault or a
traceback; a second trainer on the run refused; a kill -9'd trainer's lock taken
over; every interrupted run resumes with the same command."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import train_overrides

from perspective_jax.cli.train import run as train_cli
from perspective_jax.rundir.lock import lock_path

STEPS = 100
OVERRIDES = train_overrides(**{"train.steps": STEPS, "checkpoint.every": 50})
RESUME = "rerun the same command to resume"

pytestmark = pytest.mark.slow


def args(run_dir, corpus):
    return ["--stage", "dense", "--run-dir", str(run_dir), "--data", str(corpus),
            "--no-progress", *OVERRIDES]


def start(run_dir, corpus, **env):
    return subprocess.Popen([sys.executable, "-m", "perspective_jax.cli.train",
                             *args(run_dir, corpus)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})


def wait_for(condition, proc, what, timeout=240):
    t0 = time.time()
    while not condition():
        assert proc.poll() is None, f"trainer exited before {what}: {proc.stderr.read()}"
        assert time.time() - t0 < timeout, f"no {what} after {timeout}s"
        time.sleep(0.01)


def stop(proc, sig, within):
    """Send `sig`; the trainer exits 130 within `within` seconds, its stderr clean."""
    t0 = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    took = time.time() - t0
    assert proc.returncode == 130, (proc.returncode, err)
    assert took < within, (took, err)
    assert "Traceback" not in err and "Segmentation" not in err and "Fatal" not in err, err
    return err.strip().splitlines()


def train_log(run_dir):
    """The steps of metrics.jsonl's train records, in the order they were written."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines())
            if r["kind"] == "train"]


def holder_pid(run_dir):
    try:
        return json.loads(open(lock_path(run_dir)).read())["pid"]
    except (OSError, ValueError):
        return None


def test_signals_and_a_second_writer_at_each_moment_of_one_run(tmp_path, text_corpus,
                                                               capsys):
    run_dir = tmp_path / "run"
    fresh = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla")}   # really compiles
    interrupted = f"; {RESUME} from the last checkpoint"

    # start-up: SIGTERM as soon as the run directory exists
    proc = start(run_dir, text_corpus, **fresh)
    wait_for(run_dir.is_dir, proc, "run directory")
    assert stop(proc, signal.SIGTERM, within=5) == ["interrupted by SIGTERM" + interrupted]

    # the first compile: SIGINT a moment after data preparation wrote config.yaml
    t0 = time.time()
    proc = start(run_dir, text_corpus, **fresh)
    config = run_dir / "config.yaml"
    wait_for(lambda: config.exists() and config.stat().st_mtime >= t0, proc, "config")
    time.sleep(1.0)
    assert stop(proc, signal.SIGINT, within=3) == ["interrupted by SIGINT" + interrupted]
    assert not train_log(run_dir), "the signal came after the first step"

    # a second trainer on the run directory is refused at once, naming the first
    first = start(run_dir, text_corpus)
    wait_for(lambda: holder_pid(run_dir) == first.pid, first, "lock")
    assert train_cli(args(run_dir, text_corpus)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and f"PID {first.pid}" in err, err

    # mid-training: the loop saves a checkpoint and stops
    wait_for(lambda: train_log(run_dir), first, "first step")
    lines = stop(first, signal.SIGINT, within=20)
    assert lines[-1].startswith("stopped by signal at step ") and RESUME in lines[-1], lines
    saved = int(lines[-1].split()[5].rstrip(";"))
    assert str(saved) in os.listdir(run_dir / "checkpoints") and saved < STEPS
    assert train_log(run_dir) == list(range(1, saved + 1))

    # kill -9 a trainer holding the lock: the lock file is left, naming a dead PID
    killed = start(run_dir, text_corpus)
    wait_for(lambda: holder_pid(run_dir) == killed.pid, killed, "lock")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert holder_pid(run_dir) == killed.pid

    # the same command takes the lock over, resumes at `saved` and finishes
    assert train_cli(args(run_dir, text_corpus)) == 0, capsys.readouterr().err
    assert train_log(run_dir) == list(range(1, STEPS + 1))
    assert not os.path.exists(lock_path(run_dir))
