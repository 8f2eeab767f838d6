"""A persistent XLA compilation cache for the command-line tools.

Every `perspective-*` run compiles the same programs again (train steps, the
engine's per-layer calls); JAX can keep them on disk so the next run loads them:
`perspective-infer` on a tiny model runs in 5.3 s instead of 12.5 s with a warm
cache on a 2-core AMD CPU (docs/benchmarks.md). Where the cache lives, first match wins:

    --compilation-cache DIR | off           the flag
    JAX_COMPILATION_CACHE_DIR               JAX's own variable (left to JAX)
    PERSPECTIVE_JAX_CACHE_DIR               this project's variable
    $XDG_CACHE_HOME/perspective-jax/xla     else ~/.cache/perspective-jax/xla
                                            (accelerator backends only)

Without a flag or variable the cache is off on the CPU backend: on many Intel CPUs
(those whose LLVM tuning sets +prefer-no-gather/+prefer-no-scatter) JAX 0.10
rejects every CPU cache entry it wrote and logs an error line for each
(jax-ml/jax#38445, openxla/xla#44565), so a default cache would only add noise
there. Where it works (this project's AMD CI machine) ask for it explicitly.

At start-up the cache is trimmed to `MAX_BYTES`, least recently used files first.
(JAX's own `jax_compilation_cache_max_size` eviction needs the `filelock` package,
which is not a dependency.) A directory that cannot be created leaves the run uncached
with a one-line note.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

MAX_BYTES = 2 << 30             # trimmed to 2 GiB at start-up, least recently used first
OFF = "off"


def add_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compilation-cache", metavar="DIR|off", default=None,
                        help="keep compiled XLA programs in DIR so later runs start faster "
                             "(default: $PERSPECTIVE_JAX_CACHE_DIR, else "
                             "~/.cache/perspective-jax/xla on an accelerator and off on "
                             "CPU; 'off' disables)")


def default_dir() -> str:
    if os.environ.get("PERSPECTIVE_JAX_CACHE_DIR"):
        return os.environ["PERSPECTIVE_JAX_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "perspective-jax", "xla")


def enable(flag: Optional[str]) -> Optional[str]:
    """Turn the cache on (call before anything compiles); returns its directory, or
    None when it is off. JAX_COMPILATION_CACHE_DIR, when set and no flag is given,
    is JAX's to honour."""
    import jax
    if flag == OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if flag is None and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    if flag is None and not os.environ.get("PERSPECTIVE_JAX_CACHE_DIR") \
            and jax.default_backend() == "cpu":
        return None                           # see the module docstring
    path = os.path.abspath(os.path.expanduser(flag or default_dir()))
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as exc:
        if flag:                              # asked for explicitly: that is an error
            from perspective_jax.errors import UserError
            raise UserError(f"--compilation-cache {flag}: cannot use it ({exc}); give a "
                            "writable directory or 'off'") from None
        print(f"note: no compilation cache ({exc}); set PERSPECTIVE_JAX_CACHE_DIR or "
              "--compilation-cache", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    trim(path, MAX_BYTES)
    return path


def trim(path: str, max_bytes: int) -> int:
    """Delete the least recently used files under `path` (subdirectories included, e.g.
    XLA's GPU autotune cache) until it holds at most `max_bytes`; returns the bytes
    freed. "Used" is the later of access and modification time (a cache hit reads a
    file; on a `relatime` mount its access time still moves at least daily). Files that
    vanish or cannot be read meanwhile are skipped."""
    entries = []
    for root, _, names in os.walk(path):          # os.walk skips unreadable directories
        for name in names:
            file = os.path.join(root, name)
            try:
                st = os.lstat(file)
            except OSError:
                continue
            entries.append((max(st.st_atime, st.st_mtime), st.st_size, file))
    total, freed = sum(size for _, size, _ in entries), 0
    for _, size, file in sorted(entries):
        if total - freed <= max_bytes:
            break
        try:
            os.remove(file)
            freed += size
        except OSError:
            continue
    return freed
