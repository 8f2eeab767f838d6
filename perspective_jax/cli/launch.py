"""Console-script entry points: pick the host allocator (`cli.allocator`), which
needs a re-execution before anything heavy is imported, then run the command.
`perspective-train` and `perspective-export` get the faster allocator on CPU;
`perspective-infer`, `-info` and `-budget` run as they are.

pyproject.toml maps `perspective-train` to `launch:train` and so on; the command
modules themselves (`python -m perspective_jax.cli.train`) run without it.
"""

from __future__ import annotations

import importlib

from perspective_jax.cli.allocator import ensure_fast_allocator


def _run(module: str, fast_allocator: bool = True) -> None:
    if fast_allocator:
        ensure_fast_allocator()
    importlib.import_module(f"perspective_jax.cli.{module}").main()


def train() -> None:
    _run("train")


def export() -> None:
    _run("export")


def infer() -> None:
    # The streaming engine keeps its host memory within a budget measured as RSS;
    # jemalloc with decay disabled keeps freed pages mapped, so infer stays on the
    # system allocator (its decode speed with jemalloc is not measured yet).
    _run("infer", fast_allocator=False)


def info() -> None:
    _run("info", fast_allocator=False)


def budget() -> None:
    _run("budget", fast_allocator=False)
