"""Shared CLI plumbing: config arguments and one-line errors instead of tracebacks."""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys

from perspective_jax.errors import UserError


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML preset, e.g. curricula/tiny.yaml "
                        "(defaults to the built-in schema defaults)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="dotted overrides applied after the YAML, e.g. model.d_model=256")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, bad value) are one line, exit 2, like every
    other user error (`cli_entry` prints them)."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def finite_float(text: str) -> float:
    """argparse type: a float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def check_output_file(path: str, flag: str) -> None:
    """Fail now — before any work whose result would be lost — unless `path` can be
    written: not a directory, in an existing, writable directory."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a directory; give a file name")
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {path}: directory {parent} is not writable")


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
