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


# argparse types for every numeric flag: a value outside its range is a one-line error
# naming the flag ("argument --top-k: must lie in [0, 2147483647], got -1").
MAX_COUNT = 2**31 - 1     # the most any count flag may give (tokens, slots, rows)
MAX_MB = float(2**30)     # the most any memory or disk flag may give, in MB (1 PiB)


def finite_float(text: str) -> float:
    """argparse type: a float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def int_in(lo: int, hi: int = MAX_COUNT):
    """argparse type: an integer in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must lie in [{lo}, {hi}], got {text}")
        return value
    return parse


def float_in(lo: float, hi: float, open_low: bool = False):
    """argparse type: a finite float in [lo, hi], or (lo, hi] with `open_low`."""
    def show(x: float) -> str:
        return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"

    def parse(text: str) -> float:
        value = finite_float(text)
        if not (lo < value if open_low else lo <= value) or value > hi:
            raise argparse.ArgumentTypeError(
                f"must lie in {'(' if open_low else '['}{show(lo)}, {show(hi)}], got {text}")
        return value
    return parse


megabytes = float_in(0.0, MAX_MB)      # a memory or disk size in MB
share = float_in(0.0, 1.0)             # a fraction


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
