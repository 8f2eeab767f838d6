"""Atomic publication of a model directory written in a sibling staging directory.

    check_destination(out, force, protected=(run_dir,))   # before any heavy work
    tmp = staging_dir(out)                  # OUT.partial-PID (stale ones are removed)
    ... write every file into tmp, the manifest last ...
    publish(tmp, out, force)                # OUT holds tmp's files; nothing half-done

`--force` only ever replaces an earlier model directory (a manifest of format
`perspective-model`) or an empty directory; it never deletes a run directory,
a directory that contains one, or anything else the user keeps there. The old
directory is renamed aside before the new one is renamed in, and deleted only
after that succeeded, so a crash leaves either the old or the new export in
place (plus, at worst, a `.old-PID` or `.partial-PID` sibling that the next
export removes once its process is gone). Files are fsynced before the rename.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from typing import Iterable

from perspective_jax.errors import UserError
from perspective_jax.modeldir import format as md

_SIBLING = re.compile(r"\.(partial|old)-(\d+)$")


def is_model_dir(path: str) -> bool:
    """True when `path` holds the manifest of a Perspective model directory."""
    try:
        with open(os.path.join(path, md.MANIFEST)) as fh:
            return json.load(fh).get("format") == md.FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def check_destination(out: str, force: bool, protected: Iterable[str] = ()) -> None:
    """Raise `UserError` unless `out` may be written: it must not be, nor contain, a
    `protected` directory (the run exported from), and may exist only with `force`
    and only as an earlier model directory or an empty directory."""
    real = os.path.realpath(out)
    for keep in protected:
        kept = os.path.realpath(keep)
        if real == kept or kept.startswith(real.rstrip(os.sep) + os.sep):
            what = "is" if real == kept else "contains"
            raise UserError(f"--out {out} {what} the run directory {keep}; choose a "
                            "separate output directory")
    if not os.path.lexists(out):
        return
    if not force:
        raise UserError(f"--out {out} already exists; pass --force to replace it")
    if not os.path.isdir(out) or os.path.islink(out):
        raise UserError(f"--out {out} is not a directory; --force only replaces an earlier "
                        "model directory — remove it yourself or choose another path")
    if os.listdir(out) and not is_model_dir(out):
        raise UserError(f"--out {out} exists and is not a model directory (no "
                        f"{md.MANIFEST} of a perspective export); --force only replaces an "
                        "earlier export — remove it yourself or choose another path")


def staging_dir(out: str) -> str:
    """A fresh, empty `OUT.partial-PID` beside `out`, after removing the staging and
    set-aside siblings of `out` left by processes that no longer run."""
    out = os.path.abspath(out)
    for path in glob.glob(glob.escape(out) + ".*-*"):
        m = _SIBLING.search(path)
        if m and path[: m.start()] == out and not _alive(int(m.group(2))):
            shutil.rmtree(path, ignore_errors=True)
    tmp = f"{out}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create {tmp} ({e.strerror}); choose a "
                        "writable place") from None
    return tmp


def publish(tmp: str, out: str, force: bool) -> None:
    """Move the finished `tmp` to `out` (checked again: it may have appeared since)."""
    check_destination(out, force)
    _fsync_tree(tmp)
    old = None
    if os.path.lexists(out):
        old = f"{os.path.abspath(out)}.old-{os.getpid()}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)               # put the earlier export back
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(out)))
    if old is not None:
        shutil.rmtree(old)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                   # someone else's live process
        return True
    return True


def _fsync_tree(root: str) -> None:
    for here, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(here, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(here)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:                           # some file systems refuse directory fsync
        pass
    finally:
        os.close(fd)
