"""Two processes × 4 CPU devices train one run (JAX's distributed runtime on 127.0.0.1).

One scenario, three launches of `perspective-train` pairs (each pair compiles once):
the pair trains; process 1 is killed (SIGKILL, its supervisor and trainer) after the
first checkpoints; process 0 must stop by itself within a bounded time with one line;
the same command relaunched resumes, and every step's loss — those before the kill
and those after the resume — equals an uninterrupted one-process × 8-device run's.
The pair's checkpoint then restores in one process and continues like the reference.

Tolerance: the two runs compile the same sharded program on the same mesh shape, but
the cross-process all-reduce (gloo) sums in another order than the in-process one,
so losses differ by float32 rounding that grows with the steps: 1e-4 absolute over
16 steps (measured 3e-5 at 40 steps).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import train_overrides
from perspective_jax.cli.train import run
from perspective_jax.train.metrics import read_metrics

STEPS = 16
KILL_AFTER = 8          # train records logged before process 1 is killed
HEARTBEAT_S = 10
LAUNCH = "from perspective_jax.cli.launch import train; train()"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(steps: int) -> list[str]:
    return train_overrides(**{"train.steps": steps, "checkpoint.every": 3})


def launch_pair(run_dir, corpus, port: int) -> list[subprocess.Popen]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu", "TMPDIR": str(run_dir.parent)}   # the runtime logs
    procs = []
    for i in range(2):
        args = ["--stage", "dense", "--run-dir", str(run_dir), "--data", str(corpus),
                "--no-progress", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                "--process-id", str(i), "--heartbeat-timeout", str(HEARTBEAT_S),
                "--init-timeout", "240", *overrides(STEPS)]
        procs.append(subprocess.Popen([sys.executable, "-c", LAUNCH, *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"process did not end within {timeout:.0f}s: {err[-2000:]}")
    return proc.returncode, out, err


def train_records(run_dir) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as fh:
        return sum('"kind": "train"' in line for line in fh)


def losses(run_dir) -> np.ndarray:
    return np.array([r["loss"] for r in read_metrics(str(run_dir), "train")])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import argparse
    import difflib
    import inspect
    out = tmp_path_factory.mktemp("mp-corpus")
    for mod in (argparse, difflib):
        (out / f"{mod.__name__}.py").write_text(inspect.getsource(mod))
    return out


@pytest.mark.slow
def test_two_processes_train_die_together_resume_and_restore_in_one(tmp_path, corpus):
    reference, pair = tmp_path / "one", tmp_path / "pair"
    base = ["--stage", "dense", "--data", str(corpus), "--no-progress"]
    assert run([*base, "--run-dir", str(reference), *overrides(STEPS)]) == 0

    # 1. the pair trains until process 1 is killed; process 0 stops by itself
    procs = launch_pair(pair, corpus, free_port())
    deadline = time.monotonic() + 300
    while train_records(pair) < KILL_AFTER:
        assert time.monotonic() < deadline, "the pair logged no training steps in 300 s"
        assert procs[0].poll() is None and procs[1].poll() is None, (
            procs[0].poll(), procs[1].poll(), finish(procs[0], 5)[2][-1500:])
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    rc, out, err = finish(procs[0], HEARTBEAT_S + 60)
    waited = time.monotonic() - killed_at
    finish(procs[1], 30)
    assert train_records(pair) < STEPS + 1, "the pair finished before the kill: no fault"
    assert rc == 1, (rc, err[-1500:])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: process 0 of 2: ") and (
        "stopped sending heartbeats" in lines[0] and "resume" in lines[0]), err
    assert waited < HEARTBEAT_S + 60
    assert "Traceback" not in err and "Check failure" not in err
    log = lines[0].rsplit("runtime log: ", 1)[1].rstrip(")")
    assert "stopped sending heartbeats" in open(log, encoding="utf-8").read()

    # 2. the same command again resumes from the last complete checkpoint
    procs = launch_pair(pair, corpus, free_port())
    results = [finish(p, 400) for p in procs]
    assert [r[0] for r in results] == [0, 0], [r[2][-1500:] for r in results]
    assert f"stage dense: step {STEPS}" in results[0][1] and results[1][1] == ""
    got, want = losses(pair), losses(reference)
    assert len(got) == len(want) == STEPS
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

    # 3. the pair's checkpoint restores in one process (8 devices) and continues alike
    for run_dir in (reference, pair):
        assert run([*base, "--run-dir", str(run_dir), *overrides(STEPS + 2)]) == 0
    np.testing.assert_allclose(losses(pair)[STEPS:], losses(reference)[STEPS:],
                               atol=1e-4, rtol=0)


def test_cluster_flags_are_checked_in_one_line(tmp_path, capsys):
    base = ["--stage", "dense", "--run-dir", str(tmp_path / "r"), "--no-progress"]
    for extra, expect in (
            (["--coordinator", "nohost"], "give HOST:PORT"),
            (["--coordinator", "127.0.0.1:1234"], "needs --num-processes N and --process-id"),
            (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id",
              "2"], "--process-id 2: must lie in 0 … 1"),
            (["--num-processes", "2"], "needs --coordinator"),
            (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "0",
              "--distributed", "off"], "cannot be used with --distributed off")):
        assert run([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and expect in err, err
