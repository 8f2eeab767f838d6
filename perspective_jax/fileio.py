"""Writing files so that nothing is lost, and reading them back verified.

    atomic_write(path, data)          # temp file in the same directory, fsync, rename
    digest = sha256_file(path)        # hex sha256 of a file's bytes
    raise disk_error(exc, path, need) # OSError → one-line UserError (ENOSPC, EROFS, …)
    record = seal({...}); seal_holds(record)   # a JSON record carrying its own sha256
    with naming(path): ...            # an OSError inside names `path`

Every file a run or a model directory holds is written through `atomic_write` (or
renamed into place the same way), so a crash leaves the old file or the new one,
never half of one; readers check it against a recorded sha256 before use.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from typing import Optional, Union

from perspective_jax.errors import UserError


def sha256_bytes(data) -> str:
    return hashlib.sha256(memoryview(data)).hexdigest()


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _human(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1024 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes} B"


def human_bytes(nbytes: int) -> str:
    """A size as the one-line errors write it: '512 B', '3.2 MB', '1.1 GB'."""
    return _human(nbytes)


@contextlib.contextmanager
def naming(path: str):
    """An OSError raised inside the block names `path` (a write that fails on a full
    disk carries no file name), for a caller that turns it into `disk_error`."""
    try:
        yield
    except OSError as exc:
        exc.filename = path
        raise


def free_bytes(path: str) -> Optional[int]:
    """Bytes free for an unprivileged writer on the filesystem holding `path` (its
    nearest existing ancestor), or None when it cannot be told."""
    probe = os.path.abspath(path)
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


class DiskError(UserError):
    """A failed write, said in one line; keeps the OSError and the path so a caller
    that knows more (the file's final name, the bytes the whole job needs) can say it
    again with `disk_error(err.oserror, ...)`."""

    def __init__(self, message: str, oserror: OSError, path: str):
        super().__init__(message)
        self.oserror, self.path = oserror, path


def disk_error(exc: OSError, path: str, needed: Optional[int] = None) -> DiskError:
    """The one-line error for a failed write of `path`: names the path, the cause and,
    for a full disk, the bytes needed and free."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(path)
        need = f"needs {_human(needed)}" if needed else "needs more space"
        have = f", {_human(free)} free" if free is not None else ""
        text = (f"no space left on the device writing {path} ({need}{have}); "
                "free some space and re-run the same command")
    elif exc.errno == errno.EROFS:
        text = f"cannot write {path}: the filesystem is read-only"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        text = f"cannot write {path}: permission denied"
    else:
        text = f"cannot write {path}: {exc.strerror or exc}"
    return DiskError(text, exc, path)


def atomic_write(path: str, data: Union[bytes, str]) -> None:
    """Write `data` to `path` through a temp file in the same directory, fsynced and
    renamed into place; on any failure the temp file is removed, `path` is untouched
    and an OSError becomes a one-line `UserError` (`disk_error`)."""
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:    # OSError, or a signal mid-write: no temp file left
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError):
            raise disk_error(exc, path, len(payload)) from None
        raise



def canonical_json(obj) -> bytes:
    """The bytes a JSON record is checksummed over: the record as a reader will parse
    it, with sorted keys, no whitespace, ASCII — so formatting and key order do not
    count and any changed value does."""
    as_read = json.loads(json.dumps(obj))
    return json.dumps(as_read, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode("ascii")


def seal(record: dict, key: str = "sha256") -> dict:
    """`record` plus `key`: the sha256 of its canonical JSON without that key."""
    body = {k: v for k, v in record.items() if k != key}
    return {**body, key: sha256_bytes(canonical_json(body))}


def seal_holds(record, key: str = "sha256") -> bool:
    """Whether a record written by `seal` still matches its digest."""
    if not isinstance(record, dict) or not isinstance(record.get(key), str):
        return False
    return seal(record, key)[key] == record[key]
