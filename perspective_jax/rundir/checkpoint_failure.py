"""A failed checkpoint save as one line, with orbax's own error logs summarised.

    errors = OrbaxErrorLog()          # from now on orbax's error records are counted
    raise save_failed(step_dir, exc, errors, needed, last_complete)

Orbax reports a failed asynchronous save from its worker threads as many error
records with tracebacks, then raises (or not) on the next save or wait. Those
records are held back here; the error names the step directory, the cause (a full
disk with the bytes needed and free, via `fileio.disk_error`) and the last
complete checkpoint, which a failed save never touches.
"""

from __future__ import annotations

import errno
import logging
import sys
import threading
from typing import Optional

from perspective_jax.errors import UserError
from perspective_jax.fileio import disk_error

# Words of tensorstore/orbax messages that carry no errno, and the errno they mean.
_MARKERS = (("No space left", errno.ENOSPC), ("RESOURCE_EXHAUSTED", errno.ENOSPC),
            ("Disk quota exceeded", errno.EDQUOT), ("Read-only file system", errno.EROFS),
            ("Permission denied", errno.EACCES), ("PERMISSION_DENIED", errno.EACCES),
            ("Operation not permitted", errno.EPERM))


def _first_line(text: str, limit: int = 160) -> str:
    line = " ".join(text.strip().splitlines()[:1]).strip() if text.strip() else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."


class OrbaxErrorLog(logging.Filter):
    """Holds back what orbax and the libraries under it print about a failing save:
    orbax's error records (absl logger), asyncio's "exception was never retrieved"
    records, and the tracebacks tensorstore prints (through `sys.stderr`) when its
    callbacks reach an event loop orbax already closed. Counts them, keeps the first."""

    def __init__(self):
        super().__init__()
        self.count, self.first, self.texts = 0, "", []
        self._loggers = [logging.getLogger("absl"), logging.getLogger("asyncio")]
        for logger in self._loggers:
            logger.addFilter(self)
        self._sieve = _StderrSieve(sys.stderr, self._held)
        sys.stderr = self._sieve

    def _held(self, text: str) -> None:
        self.count += 1
        self.first = self.first or _first_line(text)
        if len(self.texts) < 20:
            self.texts.append(text)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or (
                record.name == "absl" and "orbax" not in record.pathname):
            return True
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += " " + str(record.exc_info[1])
        self._held(text)
        return False

    def remove(self) -> None:
        for logger in self._loggers:
            logger.removeFilter(self)
        stream = self._sieve.release()
        if sys.stderr is self._sieve:
            sys.stderr = stream

    def summary(self, when: str) -> str:
        return (f"orbax logged {self.count} error(s) {when} (held back; the first: "
                f"{self.first})")


class _StderrSieve:
    """`sys.stderr` that passes everything through but whole tracebacks ending in
    `RuntimeError: Event loop is closed`, which it hands to `drop` instead."""

    HEAD = "Traceback (most recent call last):"
    NOISE = "RuntimeError: Event loop is closed"

    def __init__(self, stream, drop):
        self.stream, self.drop = stream, drop
        self._held = ""
        self._lock = threading.RLock()

    def write(self, text: str) -> int:
        with self._lock:
            if self.drop is None or (not self._held and not text.startswith(self.HEAD)):
                return self.stream.write(text)
            self._held += text
            lines = self._held.splitlines(keepends=True)
            for i, line in enumerate(lines[1:], 1):
                if not line.endswith("\n"):
                    break                                    # the line is still coming
                if line[:1] not in (" ", "\t"):              # the exception line: decide
                    block, rest = "".join(lines[:i + 1]), "".join(lines[i + 1:])
                    self._held = ""
                    if line.strip() == self.NOISE:
                        self.drop(block)
                    else:
                        self.stream.write(block)
                    if rest:
                        self.write(rest)
                    break
            return len(text)

    def release(self):
        """Pass everything through from now on; returns the wrapped stream."""
        with self._lock:
            self.drop = None
            if self._held:
                self.stream.write(self._held)
                self._held = ""
        return self.stream

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _causes(exc: Optional[BaseException]):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _os_error(exc: Optional[BaseException], texts) -> Optional[OSError]:
    """The OSError behind a failure: one in the exception chain, else one named by
    the words of its message or of the held-back log records."""
    chain = list(_causes(exc))
    for cause in chain:
        if isinstance(cause, OSError) and cause.errno:
            return cause
    for text in [str(c) for c in chain] + list(texts):
        for words, code in _MARKERS:
            if words in text:
                return OSError(code, words)
    return None


def save_failed(step_dir: str, exc: Optional[BaseException], errors: OrbaxErrorLog,
                needed: int, last_complete: Optional[int]) -> UserError:
    """The one-line error for a save of `step_dir` that failed (`exc`, if any raised)."""
    kept = (f"the last complete checkpoint (step {last_complete}) is intact"
            if last_complete is not None else "no checkpoint of this run is complete yet")
    if isinstance(exc, UserError):                 # already one line (e.g. the list)
        return UserError(f"{exc}; training stopped, {kept}")
    oserr = _os_error(exc, errors.texts)
    noise = f" [{errors.count} library error message(s) held back]" if errors.count else ""
    if oserr is not None:
        head = str(disk_error(oserr, step_dir, needed or None))
        again = ("" if oserr.errno in (errno.ENOSPC, errno.EDQUOT)
                 else " — re-run the same command to resume once that is fixed")
        return UserError(f"{head}; training stopped, {kept}{again}{noise}")
    reason = _first_line(str(exc)) if exc is not None else errors.first
    return UserError(f"saving the checkpoint {step_dir} failed ({reason or 'no reason given'})"
                     f"; training stopped, {kept} — re-run the same command to resume "
                     f"once that is fixed{noise}")
