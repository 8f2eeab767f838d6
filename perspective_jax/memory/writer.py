"""One writer per memory file; readers need no lock.

    with memory_writer("facts.hdm") as mf:                    # an existing file
        mf.memory.add(key_hv, value_hv, key="…", value="…")
    with memory_writer("new.hdm", params=MemoryParams(), model=identity,
                       centre=centre) as mf:                  # created when missing
        ...

A writer holds an exclusive `flock` on `PATH.lock` (`rundir.lock.hold_lock_file`;
the kernel drops it when its holder dies, however it dies) from before it loads
the file until after it has saved it, so two writers' read–modify–write sessions
never interleave and no update is lost. A writer that finds the lock taken tries
again every `RETRY_S` until `timeout` seconds have passed, then raises the lock's
one-line `UserError` naming the holder's PID; a write failure (`DiskError`) is
not retried. Threads of one process take turns the same way (the flock cannot
tell them apart); one thread opening the same file twice is refused at once.

The body gets the `MemoryFile` (`memory_file.load`, or — when the file does not
exist and `params` is given — a new empty memory with `centre` and `model`). On a
normal exit the file is saved (`memory_file.save`) if the memory was created or
changed: its entry count or `next_id` moved (every add, replacement and removal
moves one) or `mf.memory` was replaced. An exception leaving the body saves
nothing: the file stays as it was.

Readers (`memory_file.load`) take no lock: a save writes a temporary file and
renames it over the old one (`fileio.atomic_write`), so a reader opens either the
old file or the new one, each whole and checksummed, never a mix.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from typing import Iterator, Optional

import numpy as np

from perspective_jax.errors import UserError
from perspective_jax.fileio import DiskError
from perspective_jax.memory.memory_file import MemoryFile, load, save
from perspective_jax.memory.store import HDMemory, MemoryParams
from perspective_jax.rundir.lock import hold_lock_file

LOCK_SUFFIX = ".lock"
RETRY_S = 0.05                # between tries for a lock another writer holds

_guard = threading.Lock()
_thread_locks: dict[str, threading.Lock] = {}    # real path → this process's turn
_local = threading.local()                       # .paths: files this thread writes


def lock_path(path: str) -> str:
    """The lock file of memory file `path`: PATH.lock beside it."""
    return path + LOCK_SUFFIX


def _thread_lock(key: str) -> threading.Lock:
    with _guard:
        return _thread_locks.setdefault(key, threading.Lock())


def _hold(stack: contextlib.ExitStack, path: str, deadline: float, timeout: float) -> None:
    """Enter the flock on PATH.lock into `stack`, retrying a refusal until `deadline`."""
    while True:
        try:
            stack.enter_context(hold_lock_file(lock_path(path),
                                               directory=f"memory file {path}", unit="file"))
            return
        except DiskError:
            raise
        except UserError as exc:
            if time.monotonic() >= deadline:
                raise UserError(f"{exc}; still locked after {timeout:g} s") from None
            time.sleep(RETRY_S)


def _fingerprint(mf: MemoryFile) -> tuple:
    return id(mf.memory), len(mf.memory), mf.memory.next_id


@contextlib.contextmanager
def memory_writer(path: str, params: Optional[MemoryParams] = None,
                  model: Optional[str] = None, centre: Optional[np.ndarray] = None,
                  timeout: float = 10.0) -> Iterator[MemoryFile]:
    """Hold memory file `path` for writing (module docstring); yields its MemoryFile.
    `params`, `model`, `centre` [d]: what a missing file is created with (`params`
    None: a missing file is a one-line error)."""
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout >= 0):
        raise UserError(f"memory writer timeout {timeout!r}: must be a number of seconds >= 0")
    if params is not None and centre is None:
        raise TypeError("memory_writer: creating a memory needs its codebook centre")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"memory file {path}: directory {parent} does not exist; create it "
                        "first")
    if os.path.isdir(path):
        raise UserError(f"memory file {path} is a directory")
    key = os.path.realpath(path)
    mine = _local.__dict__.setdefault("paths", set())
    if key in mine:
        raise UserError(f"memory file {path} is already open for writing in this thread; "
                        "a second writer inside the first would lose one's changes")
    deadline = time.monotonic() + timeout
    turn = _thread_lock(key)
    if not turn.acquire(timeout=timeout):
        raise UserError(f"memory file {path} is in use by another thread of this process "
                        f"(PID {os.getpid()}); still locked after {timeout:g} s")
    mine.add(key)
    try:
        with contextlib.ExitStack() as stack:
            _hold(stack, path, deadline, timeout)
            created = params is not None and not os.path.exists(path)
            mf = (MemoryFile(HDMemory.new(params), centre, model) if created
                  else load(path))
            before = _fingerprint(mf)
            yield mf
            if created or _fingerprint(mf) != before:
                save(path, mf)
    finally:
        mine.discard(key)
        turn.release()
