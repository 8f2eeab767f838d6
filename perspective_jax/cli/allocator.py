"""The host allocator CPU runs use, chosen before JAX starts (issue 19).

XLA:CPU allocates and frees a large temporary buffer on every execution of a
compiled step. With glibc's malloc each such buffer is a fresh mmap, so every
training step pays tens of thousands of minor page faults (~15 % of a
TinyShakespeare step). Two remedies, measured in docs/benchmarks.md:

* **jemalloc** (`LD_PRELOAD`) with `MALLOC_CONF=oversize_threshold:0,
  dirty_decay_ms:-1,muzzy_decay_ms:-1` keeps freed pages mapped and reuses them
  (the fastest; needs the system library, e.g. Debian/Ubuntu `libjemalloc2`);
* glibc's own **`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`** (glibc ≥ 2.35) backs
  large blocks with transparent huge pages: 512× fewer faults, no dependency.

An allocator can only be chosen when a process starts, so the console scripts
go through `perspective_jax.cli.launch`, which re-executes the same command once
with the environment `allocator_env` returns. Accelerator runs are left alone
(their step buffers live on the device). `PERSPECTIVE_ALLOCATOR` = ``auto``
(default: jemalloc if found, else hugetlb) | ``jemalloc`` | ``hugetlb`` |
``system`` (no change). Only the standard library is imported here.
"""

from __future__ import annotations

import ctypes.util
import importlib.metadata
import os
import platform
import sys
from typing import Mapping, Optional

ENV_CHOICE = "PERSPECTIVE_ALLOCATOR"
ENV_DONE = "PERSPECTIVE_ALLOCATOR_APPLIED"          # set in the re-executed process
CHOICES = ("auto", "jemalloc", "hugetlb", "system")
JEMALLOC_CONF = "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"
HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"
_ACCELERATOR_DISTS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")


def find_jemalloc() -> Optional[str]:
    """The jemalloc shared library the dynamic loader can preload, or None."""
    return ctypes.util.find_library("jemalloc")


def glibc_has_hugetlb() -> bool:
    """glibc ≥ 2.35 (the release that added the glibc.malloc.hugetlb tunable)."""
    lib, version = platform.libc_ver()
    if lib != "glibc" or not version:
        return False
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 35)


def accelerator_installed(env: Mapping[str, str]) -> bool:
    """Whether this process may run on an accelerator: JAX_PLATFORMS names one first,
    or (unset) a CUDA / ROCm / TPU plugin of JAX is installed."""
    platforms = env.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() != "cpu"
    names = {(d.metadata["Name"] or "").lower() for d in importlib.metadata.distributions()}
    return any(n.startswith(prefix) for n in names for prefix in _ACCELERATOR_DISTS)


def allocator_env(env: Mapping[str, str], *, jemalloc: Optional[str], hugetlb: bool,
                  accelerator: bool) -> tuple[Optional[dict], str]:
    """(the environment to re-execute with, or None to run as is; a one-line reason).

    Pure: the probes are arguments, so every branch is testable."""
    if env.get(ENV_DONE):
        return None, env[ENV_DONE]
    choice = env.get(ENV_CHOICE, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV_CHOICE}={env.get(ENV_CHOICE)!r}: use one of {', '.join(CHOICES)}")
    if choice == "system":
        return None, "system (PERSPECTIVE_ALLOCATOR=system)"
    if choice == "auto" and accelerator:
        return None, "system (an accelerator may be used)"
    if choice == "jemalloc" and not jemalloc:
        raise ValueError(f"{ENV_CHOICE}=jemalloc but no libjemalloc was found "
                         "(install libjemalloc2, or use auto)")
    new = dict(env)
    if jemalloc and choice in ("auto", "jemalloc"):
        preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p]
        new["LD_PRELOAD"] = ":".join([jemalloc, *preload])
        new.setdefault("MALLOC_CONF", JEMALLOC_CONF)
        new[ENV_DONE] = f"jemalloc ({jemalloc}, MALLOC_CONF={new['MALLOC_CONF']})"
        return new, new[ENV_DONE]
    if not hugetlb:
        return None, "system (no jemalloc, glibc < 2.35)"
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    if not any(t.startswith("glibc.malloc.hugetlb=") for t in tunables):
        tunables.append(HUGETLB_TUNABLE)
    new["GLIBC_TUNABLES"] = ":".join(tunables)
    new[ENV_DONE] = f"glibc malloc with {HUGETLB_TUNABLE}"
    return new, new[ENV_DONE]


def describe_allocator(env: Optional[Mapping[str, str]] = None) -> str:
    """What this process runs with, for benchmark headers."""
    env = os.environ if env is None else env
    return env.get(ENV_DONE) or "system (glibc malloc)"


def ensure_fast_allocator(argv: Optional[list] = None) -> None:
    """Re-execute this command once with the allocator `allocator_env` picks (no-op
    when it picks none, or already did). `argv`: the command line to re-run
    (default: this interpreter's own, `sys.orig_argv`, so `-m` and `-c` survive). A bad PERSPECTIVE_ALLOCATOR is one line
    on stderr and exit 2. Linux only (LD_PRELOAD and glibc tunables); elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    try:
        new_env, _ = allocator_env(os.environ, jemalloc=find_jemalloc(),
                                   hugetlb=glibc_has_hugetlb(),
                                   accelerator=accelerator_installed(os.environ))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    if new_env is None:
        return
    argv = argv or [sys.executable, *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, new_env)
