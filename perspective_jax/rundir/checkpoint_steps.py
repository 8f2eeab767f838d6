"""Which checkpoint steps are complete: the per-step list of file checksums.

    record(step_dir, step)          # after orbax finalised the step: writes the list
    problem(step_dir, step)         # None, or what is wrong ("state/d/ab… does not …")
    complete_steps(directory)       # steps that carry a list, oldest first
    set_aside(directory, steps)     # move step directories out of orbax's sight

`checksums.json` in a step directory names every other file of the step with its
size and sha256, plus a sha256 of that table (so a damaged list is told from a
damaged file). It is written atomically once the save has completed, so a step
without it — a process killed between orbax's finalise and the list — counts as
incomplete, like one killed mid-save.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from perspective_jax.fileio import atomic_write, disk_error, seal, seal_holds, sha256_file

LIST_FILE = "checksums.json"
LIST_FORMAT = 1
ASIDE_DIR = "checkpoints-set-aside"   # beside checkpoints/, outside orbax's directory


def _files(step_dir: str) -> list[str]:
    """Paths (relative, '/'-separated) of every file under `step_dir` but the list."""
    out = []
    for root, dirs, names in os.walk(step_dir):
        dirs.sort()
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir).replace(os.sep, "/")
            if rel != LIST_FILE:
                out.append(rel)
    return sorted(out)


def record(step_dir: str, step: int) -> int:
    """Write `step_dir/checksums.json` for the files now there; returns their bytes."""
    try:
        files = {rel: [sha256_file(os.path.join(step_dir, rel)),
                       os.path.getsize(os.path.join(step_dir, rel))]
                 for rel in _files(step_dir)}
    except OSError as exc:
        raise disk_error(exc, step_dir) from None
    body = seal({"format": LIST_FORMAT, "step": step, "files": files})
    atomic_write(os.path.join(step_dir, LIST_FILE), json.dumps(body, indent=1))
    return sum(size for _, size in files.values())


def _read_list(step_dir: str, step: int):
    """(files table, None) or (None, what is wrong with the list)."""
    path = os.path.join(step_dir, LIST_FILE)
    if not os.path.isfile(path):
        return None, f"it has no {LIST_FILE} (its save never completed)"
    try:
        with open(path, "rb") as fh:
            body = json.loads(fh.read().decode("utf-8"))
        files = body["files"]
        ok = (body.get("format") == LIST_FORMAT and body.get("step") == step
              and seal_holds(body))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    return (files, None) if ok else (None, f"its {LIST_FILE} is damaged")


def problem(step_dir: str, step: int) -> Optional[str]:
    """None when every file of the step matches its list, else the first problem,
    naming the file (relative to the step directory)."""
    files, wrong = _read_list(step_dir, step)
    if wrong:
        return wrong
    present = _files(step_dir)
    for rel in sorted(set(files) - set(present)):
        return f"{rel} is missing"
    for rel in present:
        if rel not in files:
            return f"{rel} is not in its {LIST_FILE} (an extra file)"
        path = os.path.join(step_dir, rel)
        digest, size = files[rel]
        try:
            same = os.path.getsize(path) == size and sha256_file(path) == digest
        except OSError as exc:
            return f"{rel} cannot be read ({exc.strerror or exc})"
        if not same:
            return f"{rel} does not match its checksum"
    return None


def step_bytes(step_dir: str) -> Optional[int]:
    """Bytes of a complete step's files, from its list (None if unreadable)."""
    try:
        with open(os.path.join(step_dir, LIST_FILE), "rb") as fh:
            return sum(int(size) for _, size in json.load(fh)["files"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def step_dirs(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory)
                  if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def complete_steps(directory: str) -> list[int]:
    """Steps under a checkpoints directory that carry a list (not yet verified)."""
    return [s for s in step_dirs(directory)
            if os.path.isfile(os.path.join(directory, str(s), LIST_FILE))]


def unlisted_steps(directory: str) -> list[int]:
    """Steps orbax finalised whose list was never written."""
    return [s for s in step_dirs(directory)
            if not os.path.isfile(os.path.join(directory, str(s), LIST_FILE))]


def set_aside(directory: str, steps) -> str:
    """Move the step directories `steps` of `directory` (a run's checkpoints/) into
    `<run>/checkpoints-set-aside/` (a repeated step gets a .N suffix); returns it."""
    dest = os.path.join(os.path.dirname(os.path.abspath(directory)), ASIDE_DIR)
    for step in steps:
        target, n = os.path.join(dest, str(step)), 1
        while os.path.exists(target):
            target, n = os.path.join(dest, f"{step}.{n}"), n + 1
        try:
            os.makedirs(dest, exist_ok=True)
            shutil.move(os.path.join(directory, str(step)), target)
        except OSError as exc:
            raise disk_error(exc, target) from None
    return dest
