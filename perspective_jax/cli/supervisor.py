"""One process of a multi-process run, watched by a small supervisor without JAX.

    rc = supervise(argv, spec)        # perspective-train, several processes

When a peer dies, JAX's distributed runtime ends the survivors itself: a missed
heartbeat (`--heartbeat-timeout`) or the coordinator's closed socket makes it
abort the process (SIGABRT, with a native stack trace) rather than hang in a
collective. The supervisor turns that into one line. It runs the trainer as a
child (`python -m perspective_jax.cli.train …`, which dies with its supervisor)
whose native runtime output (XLA, gloo, the coordination service) goes to a file
(`redirect_runtime_log`, in the child) while Python's own output — results,
progress, notes, errors — stays on the terminal; SIGINT/SIGTERM are passed on. A child that
ends normally (0, a one-line error 2, 130 after a signal) keeps its exit code and
its log is removed; one the runtime ended gets
`error: process I of N: <reason>; … resume …` naming the kept log, and exit 1.
Only the standard library is imported here.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
from typing import Optional

from perspective_jax.cli.cluster import ClusterSpec

ENV_LOG = "PERSPECTIVE_RUNTIME_LOG"     # set in the child: where its native log goes
NORMAL = (0, 2, 130)                    # exit codes whose reason the child printed itself
_PR_SET_PDEATHSIG = 1


def redirect_runtime_log() -> None:
    """In the child: file descriptors 1 and 2 (where the native runtime writes) → the
    log file; Python's sys.stdout and sys.stderr stay on the terminal."""
    path = os.environ.get(ENV_LOG)
    if not path:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        terminal = os.dup(fd)
        os.dup2(log, fd)
        setattr(sys, name, open(terminal, "w", buffering=1, encoding="utf-8",
                                errors="backslashreplace", closefd=True))
    os.close(log)


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when its supervisor dies (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _tail(path: str, limit: int = 65536) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(fh.tell() - limit, 0))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def reason(log_text: str, returncode: int) -> str:
    """Why the runtime ended the child, from its log."""
    lines = log_text.splitlines()
    for i, line in enumerate(lines):
        if "stopped sending heartbeats" in line:
            tasks = lines[i + 1].strip() if i + 1 < len(lines) else ""
            which = f"process(es) {tasks}" if tasks.replace(",", "").replace(" ", "").isdigit() \
                else "another process"
            return f"{which} stopped sending heartbeats (died, was killed or hangs)"
    text = log_text
    if "RegisterTask" in text or "Barrier timed out" in text:
        return ("could not join the run: not every process joined within --init-timeout "
                "(start the same command on every host, with the coordinator reachable)")
    if "Socket closed" in text or "failed to connect" in text or "Connection reset" in text:
        return "lost the coordinator (process 0 died or was killed)"
    if "DEADLINE_EXCEEDED" in text:
        return "a collective or barrier timed out (a process stopped responding)"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"ended by {name}"
    return f"ended with exit code {returncode}"


def supervise(argv: list[str], spec: ClusterSpec, module: str = "perspective_jax.cli.train"
              ) -> int:
    """Run `python -m module argv` as this process's trainer; see the module doc."""
    fd, log = tempfile.mkstemp(prefix="perspective-train-", suffix=".log")
    os.close(fd)
    child = subprocess.Popen([sys.executable, "-m", module, *argv],
                             env={**os.environ, ENV_LOG: log}, preexec_fn=_die_with_parent)
    previous = {}

    def forward(signum, _frame):
        if child.poll() is None:
            child.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, forward)
    try:
        rc: Optional[int] = None
        while rc is None:
            try:
                rc = child.wait()
            except InterruptedError:
                continue
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if rc in NORMAL:
        os.remove(log)
        return rc
    if rc == 1:                        # a Python traceback: already on the terminal
        print(f"(runtime log of {spec.label}: {log})", file=sys.stderr)
        return 1
    print(f"error: {spec.label}: {reason(_tail(log), rc)}; the other processes stop too — "
          f"rerun the same command on every host to resume from the last complete "
          f"checkpoint (runtime log: {log})", file=sys.stderr)
    return 1
