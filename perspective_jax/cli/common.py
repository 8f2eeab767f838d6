"""Shared CLI plumbing: config arguments and one-line errors instead of tracebacks."""

from __future__ import annotations

import argparse
import functools
import sys

from perspective_jax.errors import UserError


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML preset, e.g. curricula/tiny.yaml "
                        "(defaults to the built-in schema defaults)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="dotted overrides applied after the YAML, e.g. model.d_model=256")


def cli_entry(fn):
    """Wrap a `main(argv) -> int`: UserError → 'error: …' on stderr, exit 2."""
    @functools.wraps(fn)
    def wrapper(argv=None):
        try:
            return fn(argv) or 0
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    return wrapper


def exit_with(fn):
    """Console-script adapter: `sys.exit(fn(sys.argv[1:]))`."""
    def run():
        sys.exit(fn(sys.argv[1:]))
    return run
