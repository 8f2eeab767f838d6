"""One writer per run directory: an advisory lock held for the life of a writer.

    with hold_run_dir("runs/x"):                  # trainer: RUN_DIR/.lock, exclusive
        ...
    with hold_run_dir("runs/x", shared=True):     # a reader (export): many at once
        ...
    with hold_output_dir("models/tiny"):          # models/tiny.lock, beside a directory
        ...                                       # that is renamed into place

The lock is `fcntl.flock` on a small file; the kernel releases it when its holder
exits, however it exits (kill -9 included), so a lock left by a dead process is
simply taken over. Whether a lock is held is decided by `flock` alone. The refusal
names the holder by the kernel's lock list (/proc/locks); the file also holds the
holder's PID, host, command and start time, a courtesy used for the start time and,
where the kernel's list is unavailable (another host over NFS), for the name, and
then only while that process is alive. A process may re-enter a lock it holds
(`--stage all` holds the curriculum root, then each stage directory, whose trainer
takes its run directory again); re-entry is a no-op, whatever its mode.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Iterator, Optional

from perspective_jax.errors import UserError
from perspective_jax.fileio import disk_error

LOCK_FILE = ".lock"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)
_held: set[str] = set()              # lock files (real paths) this process holds


def lock_path(run_dir: str) -> str:
    return os.path.join(run_dir, LOCK_FILE)


def _short(command: str) -> str:
    """A command on one line of at most 80 characters."""
    text = " ".join(command.split())
    return text if len(text) <= 80 else text[:77] + "..."


def _command() -> str:
    return _short(" ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]]))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # someone else's process: alive
        return True
    return True


def _flock_pids(path: str) -> Optional[list[int]]:
    """PIDs holding a flock on `path` as the kernel lists them (/proc/locks), or
    None where it cannot tell (not Linux, or the file is gone)."""
    try:
        st = os.stat(path)
        with open("/proc/locks", encoding="ascii") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in lines:
        f = line.split()
        if len(f) >= 6 and f[1] == "FLOCK" and f[5] == key and f[4].isdigit():
            pids.append(int(f[4]))
    return [p for p in dict.fromkeys(pids) if p > 0] or None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return ""
    if len(argv) > 1 and os.path.basename(argv[0]).startswith("python"):
        argv = argv[1:]           # `python -m x` / `python script.py`: the program
    return _short(" ".join([os.path.basename(argv[0]), *argv[1:]]) if argv else "")


def _read_info(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as fh:
            info = json.loads(fh.read())
        info["pid"] = int(info["pid"])
        return info
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _holder(path: str) -> str:
    """'PID 123 (perspective-train …, since 12:00:01)'. The PID is the kernel's (its
    lock list); the file's command and time are shown only for that PID (else the
    command is /proc's). Where the kernel's list is unavailable the file's name counts
    only while its process is alive on this host — a holder that has just taken the
    lock may not have written it yet, so a stale one is read again."""
    pids = _flock_pids(path)
    if pids:
        info = _read_info(path) or {}
        parts = []
        for pid in pids[:3]:
            mine = info.get("pid") == pid
            what = (_short(str(info.get("command", ""))) if mine else "") or _cmdline(pid)
            since = info.get("since") if mine else None
            what = ", ".join(x for x in (what, f"since {since}" if since else "") if x)
            parts.append(f"PID {pid}" + (f" ({what})" if what else ""))
        return " and ".join(parts)
    for _ in range(20):
        info = _read_info(path)
        if info is not None:
            host = str(info.get("host", ""))
            local = host == socket.gethostname()
            if not local or _alive(info["pid"]):
                what = ", ".join(x for x in (_short(str(info.get("command", ""))),
                                             f"since {info['since']}" if info.get("since")
                                             else "") if x)
                return (f"PID {info['pid']}" + ("" if local else f" on {host}")
                        + (f" ({what})" if what else ""))
        time.sleep(0.05)
    return "another process"


def _refusal(path: str, directory: str, shared: bool, unit: str = "directory") -> UserError:
    holder = _holder(path)
    doing = "is being written by" if shared else "is in use by"
    return UserError(f"{directory} {doing} {holder}; wait for it to finish or stop it "
                     f"(one writer per {unit})")


def _open_locked(path: str, shared: bool, directory: str, optional: bool,
                 unit: str = "directory") -> Optional[int]:
    """An fd of `path` holding the flock, or None where the filesystem has no locks
    or, when `optional`, no lock file exists and none can be created."""
    op = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if not optional:
                raise disk_error(exc, path) from None
            try:                             # e.g. a reader of a read-only directory
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
        try:
            fcntl.flock(fd, op)
        except BlockingIOError:
            os.close(fd)
            raise _refusal(path, directory, shared, unit) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in _UNSUPPORTED:
                print(f"note: {directory}: the filesystem has no file locks; nothing "
                      "stops a second writer", file=sys.stderr)
                return None
            raise disk_error(exc, path) from None
        # A releasing holder unlinks the file while locked: if ours is no longer the
        # file at `path`, we locked a file nobody else will see; take the new one.
        try:
            st, now = os.fstat(fd), os.stat(path)
            if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _write_holder(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError:
        pass                      # the name is a courtesy; the flock is the lock


def _release(path: str, fd: int, shared: bool) -> None:
    """Remove the lock file while still holding it exclusively (a shared holder only
    when it is the last one), then drop the lock."""
    try:
        if shared:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold_lock_file(path: str, shared: bool = False, directory: Optional[str] = None,
                   optional: bool = False, unit: str = "directory") -> Iterator[None]:
    """Hold the flock on `path` (created) for the body, or raise a one-line
    `UserError` naming the holder. `directory` is what the message calls locked
    (`unit`: what kind of thing, "one writer per <unit>"); `optional`: go on
    unlocked where the lock file cannot be created (the caller's own writes will
    report why)."""
    directory = directory or path
    key = os.path.realpath(path)
    if key in _held:                        # re-entered: the outer holder releases
        yield
        return
    fd = _open_locked(path, shared, directory, optional, unit)
    if fd is None:
        yield
        return
    _write_holder(fd)
    _held.add(key)
    try:
        yield
    finally:
        _held.discard(key)
        _release(path, fd, shared)


@contextlib.contextmanager
def hold_run_dir(run_dir: str, shared: bool = False) -> Iterator[None]:
    """Hold RUN_DIR/.lock: exclusive for a writer (the directory must exist), shared
    for a reader (skipped when the directory is missing or read-only)."""
    if shared and not os.path.isdir(run_dir):
        yield
        return
    with hold_lock_file(lock_path(run_dir), shared, directory=run_dir, optional=shared):
        yield


@contextlib.contextmanager
def hold_output_dir(out: str, flag: str = "--out") -> Iterator[None]:
    """Hold `OUT.lock` beside a directory that is replaced as a whole (a model
    directory is renamed into place), for a writer; skipped where it cannot be
    created (the writer reports why)."""
    out = os.path.abspath(out)
    with hold_lock_file(out + ".lock", directory=f"{flag} {out}", optional=True):
        yield
