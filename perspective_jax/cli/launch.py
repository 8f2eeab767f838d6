"""Console-script entry points: pick the host allocator (`cli.allocator`), which
needs a re-execution before anything heavy is imported, then run the command.
`perspective-train` and `perspective-export` get the faster allocator on CPU; a
`perspective-train` that is one of several processes runs under `cli.supervisor`;
`perspective-infer`, `-serve`, `-eval`, `-info`, `-budget`, `-agent`, `-memory` and
`-adapt` run as they are.

pyproject.toml maps `perspective-train` to `launch:train` and so on; the command
modules themselves (`python -m perspective_jax.cli.train`) run without it. Each
command module is imported inside its function, after the allocator choice.
"""

from __future__ import annotations

from perspective_jax.cli.allocator import ensure_fast_allocator


def train() -> None:
    ensure_fast_allocator()
    import os
    import sys
    from perspective_jax.cli.cluster import spec_from_argv
    spec = spec_from_argv(sys.argv[1:], os.environ)
    if spec is not None:            # one of several processes: run under a supervisor
        from perspective_jax.cli.supervisor import supervise
        sys.exit(supervise(sys.argv[1:], spec))
    from perspective_jax.cli.train import main
    main()


def export() -> None:
    ensure_fast_allocator()
    from perspective_jax.cli.export import main
    main()


def infer() -> None:
    # The streaming engine keeps its host memory within a budget measured as RSS;
    # jemalloc with decay disabled keeps freed pages mapped, so infer stays on the
    # system allocator (its decode speed with jemalloc is not measured yet).
    from perspective_jax.cli.infer import main
    main()


def evaluate() -> None:
    from perspective_jax.cli.eval import main
    main()


def info() -> None:
    from perspective_jax.cli.info import main
    main()


def budget() -> None:
    from perspective_jax.cli.budget import main
    main()


def serve() -> None:
    # the streaming engine's RSS-budgeted host tier, as perspective-infer
    from perspective_jax.cli.serve import main
    main()


def agent() -> None:
    from perspective_jax.cli.agent import main
    main()


def memory() -> None:
    from perspective_jax.cli.memory import main
    main()


def adapt() -> None:
    # the streaming engine's RSS-budgeted host tier, as perspective-infer
    from perspective_jax.cli.adapt import main
    main()
