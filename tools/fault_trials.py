"""The trials of `tools/fault_inject.py`: run a CLI under a fault, classify what it did.

Every trial ends in exactly one outcome:
  clean      the command failed with a one-line `error:` (or exit 130 after a signal)
             and nothing else was harmed, or it succeeded with a result identical to
             the fault-free reference (the fault did not matter, or was recovered from)
  silent     it succeeded but its result differs from the reference
  lost       a fault destroyed something the user had: a checkpoint gone or changed,
             or a killed run that the documented recovery cannot bring back exactly
  traceback  a Python traceback, a crash signal (segfault, abort) or a hang
  other      anything else the trial expected otherwise (a valid input refused, a
             signal acted on late)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional, Sequence

CLI = "import sys; from perspective_jax.cli.{0} import main; sys.argv[0] = 'perspective-{0}'; main()"
OUTCOMES = ("clean", "silent", "lost", "traceback", "other")


def cli(name: str, *args: str) -> list[str]:
    """argv running `perspective-NAME ARGS` with this interpreter."""
    return [sys.executable, "-c", CLI.format(name), *map(str, args)]


@dataclasses.dataclass
class Proc:
    rc: Optional[int]          # None: killed by us after the time limit
    out: str
    err: str
    wall_s: float


def run(argv: Sequence[str], timeout_s: float = 900, env=None) -> Proc:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s,
                           env=env, errors="replace")
        return Proc(p.returncode, p.stdout, p.stderr, time.perf_counter() - t0)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        return Proc(None, out, err, time.perf_counter() - t0)


def interrupted(argv: Sequence[str], after_s: float, sig: int,
                grace_s: float = 60) -> tuple[Proc, float]:
    """Start `argv`, send `sig` after `after_s` seconds; (result, seconds from the
    signal to the exit). A process still alive `grace_s` after the signal is killed
    and reported with rc None (a hang or a swallowed signal)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, errors="replace")
    try:
        p.wait(timeout=after_s)
        out, err = p.communicate()
        return Proc(p.returncode, out, err, time.perf_counter() - t0), 0.0
    except subprocess.TimeoutExpired:
        pass
    p.send_signal(sig)
    t_sig = time.perf_counter()
    try:
        out, err = p.communicate(timeout=grace_s)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        rc = None
    return Proc(rc, out, err, time.perf_counter() - t0), time.perf_counter() - t_sig


def crashed(proc: Proc) -> Optional[str]:
    """Why `proc` counts as a traceback outcome, or None."""
    if proc.rc is None:
        return "did not exit in time"
    if "Traceback (most recent call last)" in proc.err:
        return "traceback: " + proc.err.strip().splitlines()[-1][:120]
    if proc.rc < 0 and proc.rc != -signal.SIGKILL:
        return f"died of signal {-proc.rc}"
    if "Segmentation fault" in proc.err or "Fatal Python error" in proc.err:
        return "crashed: " + proc.err.strip().splitlines()[-1][:120]
    return None


def clean_error(proc: Proc) -> Optional[str]:
    """The one-line error of a failed command, or None when it is not one."""
    errors = [ln for ln in proc.err.splitlines() if ln.startswith("error: ")]
    if proc.rc not in (0, None) and len(errors) == 1:
        return errors[0][len("error: "):]
    return None


def tree_digest(path: str, skip=()) -> dict[str, str]:
    """{relative path: sha256} of every file under `path` (names in `skip` left out)."""
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            if name in skip:
                continue
            full = os.path.join(root, name)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def checkpoint_files(run_dir: str) -> dict[str, str]:
    """Digests of the files of a run's complete checkpoints (what a fault must not harm)."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return {}
    return {os.path.join(step, rel): d for step in os.listdir(root) if step.isdigit()
            for rel, d in tree_digest(os.path.join(root, step)).items()}


def harmed(before: dict[str, str], after: dict[str, str],
           flipped: Optional[str] = None) -> list[str]:
    """Checkpoint files that existed before a failed command and are gone or changed
    after it (the one the trial damaged itself excepted)."""
    return [rel for rel, d in before.items()
            if rel != flipped and after.get(rel) != d]


def flip_byte(path: str, rng: random.Random) -> int:
    """XOR one random byte of `path` with a random non-zero mask; the offset."""
    size = os.path.getsize(path)
    offset = rng.randrange(size)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ rng.randrange(1, 256)]))
    return offset


def copy_tree(src: str, dst: str) -> str:
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    for root, dirs, names in os.walk(dst):
        for name in dirs + names:
            os.chmod(os.path.join(root, name), 0o755 if name in dirs else 0o644)
    return dst


@dataclasses.dataclass
class Trial:
    kind: str
    outcome: str
    detail: str


def judge_result(kind: str, proc: Proc, same_as_reference: Optional[bool],
                 lost: Sequence[str] = ()) -> Trial:
    """Classify one command run under a fault (see the module docstring)."""
    why = crashed(proc)
    if why:
        return Trial(kind, "traceback", why)
    if lost:
        return Trial(kind, "lost", f"harmed {lost[0]}")
    if proc.rc == 0:
        if same_as_reference is False:
            return Trial(kind, "silent", "succeeded with a result unlike the reference")
        return Trial(kind, "clean", "result identical to the reference")
    line = clean_error(proc)
    if line is None and proc.rc == 130:
        return Trial(kind, "clean", "exit 130")
    if line is None:
        tail = (proc.err.strip().splitlines() or ["(no output)"])[-1][:120]
        return Trial(kind, "traceback", f"exit {proc.rc} without a one-line error: {tail}")
    return Trial(kind, "clean", line[:140])


def small_filesystem_prefix(mount_at: str, size_kb: int, save_to: str) -> Optional[list[str]]:
    """argv prefix running a command with a `size_kb` tmpfs mounted at `mount_at` in a
    private mount namespace (unprivileged user namespaces, or root); what the command
    left there is copied to `save_to` afterwards (the tmpfs dies with the namespace).
    None where such namespaces are not allowed."""
    if shutil.which("unshare") is None:
        return None
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        return None
    os.makedirs(mount_at, exist_ok=True)
    script = (f'mount -t tmpfs -o size={size_kb}k tmpfs "{mount_at}" || exit 97; '
              f'"$0" "$@"; rc=$?; cp -a "{mount_at}" "{save_to}"; exit $rc')
    return ["unshare", "-rm", "sh", "-c", script]
