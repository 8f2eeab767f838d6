"""Shared CLI plumbing: config arguments, one-line errors instead of tracebacks, and
signals that end a command promptly and cleanly."""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import math
import os
import signal
import sys
import threading
from typing import Optional

from perspective_jax.errors import UserError
from perspective_jax.fileio import disk_error


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


# A Python handler that is a bound method of an object with `take_signal(signum) ->
# bool` (train.hooks.StopFlag) is offered each signal first; True means it will act.
TAKE_SIGNAL = "take_signal"
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _ignore(_signum, _frame) -> None:
    """The main thread's handler: nothing. The watcher thread acts, so no
    KeyboardInterrupt is ever raised inside library code or its threads."""


class SignalWatcher:
    """SIGINT/SIGTERM end the process at once — exit 130, one line naming the signal
    and `hint` — from a thread woken through `signal.set_wakeup_fd`, which runs even
    while the main thread is inside C code (an XLA compile), by `os._exit`, so no
    interpreter teardown races live XLA or orbax threads. For commands whose files
    are written atomically (a trainer: orbax saves into temporary directories). A
    handler that takes signals (TAKE_SIGNAL) is offered them first: the training
    loop saves and stops, and exit is immediate when it declines (before its first
    step, or a second signal)."""

    def __init__(self, hint: str = ""):
        self.hint = hint
        self._reminder: Optional[threading.Timer] = None
        self.active = threading.current_thread() is threading.main_thread()

    def __enter__(self):
        if not self.active:
            return self
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._old = {sig: signal.signal(sig, _ignore) for sig in SIGNALS}
        self._thread = threading.Thread(target=self._watch, name="signal-watcher",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.active:
            return
        for sig, old in self._old.items():
            signal.signal(sig, old)
        signal.set_wakeup_fd(self._old_fd)
        os.close(self._w)                       # the watcher reads end-of-file
        self._thread.join()
        os.close(self._r)
        if self._reminder is not None:
            self._reminder.cancel()

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._r, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in SIGNALS and not self._offer(signum):
                    self._exit(signum)

    def _offer(self, signum: int) -> bool:
        """True when the installed handler takes the signal; if the process is still
        running 3 s later, say how to quit at once."""
        handler = signal.getsignal(signum)
        take = getattr(getattr(handler, "__self__", None), TAKE_SIGNAL, None)
        if not (take and take(signum)):
            return False
        self._reminder = threading.Timer(3.0, _write_stderr, [
            "stopping after this step to save a checkpoint; press Ctrl-C again to quit "
            "at once"])
        self._reminder.daemon = True
        self._reminder.start()
        return True

    def _exit(self, signum: int) -> None:
        flush = threading.Thread(target=_flush, daemon=True)
        flush.start()
        flush.join(1.0)          # the main thread may hold a stream's lock: don't wait on it
        _write_stderr(f"interrupted by {signal.Signals(signum).name}"
                      + (f"; {self.hint}" if self.hint else ""))
        os._exit(130)


def _write_stderr(line: str) -> None:
    """One line straight to fd 2 (no stream lock the main thread might hold)."""
    lead = "\n" if sys.stderr.isatty() else ""     # after a progress bar's partial line
    with contextlib.suppress(OSError):
        os.write(2, f"{lead}{line}\n".encode())


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


@contextlib.contextmanager
def signals_handled(signals: tuple, handler):
    """`handler` for `signals` inside the block, the previous handlers after it. Main
    thread only (elsewhere a plain block)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


@contextlib.contextmanager
def signals_deferred(signals: tuple = (*SIGNALS, signal.SIGHUP)):
    """Hold `signals` inside the block; one that came raises KeyboardInterrupt as the
    block ends. For starting a child process and recording it in one step, so that
    no interruption leaves a child running that no one will stop."""
    held: list = []
    with signals_handled(signals, lambda signum, _frame: held.append(signum)):
        yield
    if held:
        raise KeyboardInterrupt


# A write failing for the machine's sake (full disk, quota, read-only filesystem)
# wherever no caller named it first: still one line naming the path.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def cli_entry(fn=None, *, on_signal: Optional[str] = None):
    """Wrap a `main(argv) -> int`: UserError → 'error: …' on stderr, exit 2; so is an
    OSError of a full disk or read-only filesystem anywhere (`DISK_ERRNOS`).
    Ctrl-C: KeyboardInterrupt (the command may handle it, e.g. save a conversation),
    then 'interrupted', exit 130; with `on_signal`, SIGINT/SIGTERM are handled by a
    `SignalWatcher` instead: 'interrupted by SIGINT; <on_signal>', exit 130, at once.
    Use as `@cli_entry` or `@cli_entry(on_signal="...")`."""
    if fn is None:
        return functools.partial(cli_entry, on_signal=on_signal)

    @functools.wraps(fn)
    def wrapper(argv=None):
        watcher = SignalWatcher(on_signal) if on_signal is not None else None
        try:
            with watcher or contextlib.nullcontext():
                return fn(argv) or 0
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except BrokenPipeError:               # `… | head`: the reader has gone; stop quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 141
        except OSError as exc:
            if exc.errno not in DISK_ERRNOS:
                raise                     # a bug, not the machine: keep its traceback
            where = exc.filename or "a file"
            print(f"error: {disk_error(exc, str(where))}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted" + (f"; {on_signal}" if on_signal else ""), file=sys.stderr)
            return 130
    return wrapper


def exit_with(fn):
    """Console-script adapter: `sys.exit(fn(sys.argv[1:]))`."""
    def run():
        sys.exit(fn(sys.argv[1:]))
    return run


def add_mpd_flags(parser: argparse.ArgumentParser, switch: bool) -> None:
    """Multi-Perspective Decoding's flags (`MPDConfig`); `switch` adds --mpd itself."""
    from perspective_jax.config.choices import MPD_CONFIDENCES
    from perspective_jax.config.schema import MPDConfig
    d = MPDConfig()
    g = parser.add_argument_group("multi-perspective decoding (MPD)")
    if switch:
        g.add_argument("--mpd", action="store_true",
                       help="decide tokens with the four routing perspectives when triggered")
    g.add_argument("--mpd-every-k", type=int_in(0), default=d.every_k,
                   help="trigger every k-th token (0 = never by position)")
    g.add_argument("--mpd-p-min", type=float_in(0.0, 1.0), default=d.p_min,
                   help="trigger when P0's top probability is below this")
    g.add_argument("--mpd-h-max", type=float_in(0.0, 1e6), default=d.h_max,
                   help="trigger when P0's entropy (nats) is above this")
    g.add_argument("--mpd-tau", type=float_in(0.0, 0.6931, open_low=True), default=d.tau,
                   help="agreement threshold (mean pairwise JSD, nats)")
    g.add_argument("--mpd-max-rate", type=float_in(0.0, 1.0, open_low=True), default=d.max_rate,
                   help="MPD runs on at most this share of tokens (1 = no cap)")
    g.add_argument("--mpd-confidence", choices=MPD_CONFIDENCES, default=d.confidence,
                   help="ensemble: the views' mean probability of the token; agreement: "
                        "SPEC's 1 - agree/tau and vote share")


def mpd_from_args(a: argparse.Namespace):
    from perspective_jax.config.schema import MPDConfig
    return MPDConfig(tau=a.mpd_tau, every_k=a.mpd_every_k, p_min=a.mpd_p_min,
                     h_max=a.mpd_h_max, confidence=a.mpd_confidence, max_rate=a.mpd_max_rate)


def add_memory_flags(parser: argparse.ArgumentParser) -> None:
    """The hypervector memory's flags (`memory.recall.RecallConfig`), one definition
    for perspective-infer and perspective-serve."""
    from perspective_jax.config.choices import INJECT_MODES
    from perspective_jax.memory.recall import RecallConfig
    d = RecallConfig()
    g = parser.add_argument_group("hypervector memory (consulted when MPD finds no majority)")
    g.add_argument("--memory", metavar="FILE",
                   help="a memory file (perspective-memory) built for this model")
    g.add_argument("--memory-probes", type=int_in(1, 4096), default=d.probes,
                   help="candidate banks a query unbinds from")
    g.add_argument("--memory-min-similarity", type=float_in(0.5, 1.0),
                   default=d.min_similarity,
                   help="a value counts as found from this similarity (unrelated: 0.5)")
    g.add_argument("--memory-window", type=int_in(1), default=d.window,
                   help="the last tokens of the text a query is made of")
    g.add_argument("--memory-scale", type=float_in(0.0, 100.0, open_low=True),
                   default=d.inject_scale,
                   help="scale of the value's vector added to the residual stream")
    g.add_argument("--memory-layer", type=int_in(0), default=None,
                   help="inject after this layer (default: the middle layer)")
    g.add_argument("--memory-inject", choices=INJECT_MODES, default=d.inject,
                   help="next_token: the value's token that follows the text so far; "
                        "mean: the value's mean embedding")


def recall_config_from_args(a: argparse.Namespace):
    from perspective_jax.memory.recall import RecallConfig
    return RecallConfig(probes=a.memory_probes, min_similarity=a.memory_min_similarity,
                        window=a.memory_window, inject_scale=a.memory_scale,
                        inject_layer=a.memory_layer, inject=a.memory_inject)


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """The streaming engine's flags (`infer.options.EngineOptions`), one definition for
    perspective-infer and perspective-serve."""
    from perspective_jax.config.choices import IO_MODES, PREDICTORS
    m = parser.add_argument_group("memory and streaming")
    m.add_argument("--host-budget-mb", type=megabytes, default=1024,
                   help="hard limit for the host expert cache")
    m.add_argument("--device-budget-mb", type=megabytes, default=None,
                   help="hard limit for weights, expert slots and state on the device")
    m.add_argument("--device-slots", type=int_in(2), default=2,
                   help="expert-layer slots on the device (2 = double buffer, the least)")
    m.add_argument("--no-prefetch", action="store_true", help="load experts only when needed")
    m.add_argument("--no-deltas", action="store_true", help="never stream neighbour deltas")
    m.add_argument("--no-warm-start", action="store_true",
                   help="start with an empty host cache")
    m.add_argument("--predictor", default="auto", choices=PREDICTORS)
    m.add_argument("--io", default="mmap", choices=IO_MODES,
                   help="direct: bypass the page cache when reading experts")
    m.add_argument("--prefill-chunk", type=int_in(1), default=256)
    m.add_argument("--transfer-thread", action=argparse.BooleanOptionalAction, default=None,
                   help="copy regions to the device on a thread of their own while the "
                        "disk reads on (default: on for an accelerator, off on the CPU)")


def engine_options_from_args(a: argparse.Namespace):
    from perspective_jax.infer.options import EngineOptions
    return EngineOptions(host_budget_mb=a.host_budget_mb, device_budget_mb=a.device_budget_mb,
                         device_slots=a.device_slots, prefetch=not a.no_prefetch,
                         use_deltas=not a.no_deltas, warm_start=not a.no_warm_start, io=a.io,
                         predictor=a.predictor, prefill_chunk=a.prefill_chunk,
                         transfer_thread=a.transfer_thread)


def add_adapter_flags(parser: argparse.ArgumentParser, online: bool = False,
                      use: str = "the model runs with them") -> None:
    """--adapter FILE: an adapter file (perspective-adapt) on the model, `use` saying
    what the tool does with it; `online` adds perspective-infer's --adapt-online and
    its settings (`adapt.loop.AdaptConfig`)."""
    g = parser.add_argument_group("adapters (forward-mode adaptation, perspective-adapt)")
    g.add_argument("--adapter", metavar="FILE",
                   help="LoRA adapters (and expert coordinates) trained for this model "
                        f"by perspective-adapt: {use}")
    if not online:
        return
    from perspective_jax.adapt.loop import AdaptConfig
    d = AdaptConfig()
    g.add_argument("--adapt-online", action="store_true",
                   help="after generating, one adaptation round on the prompt's text, "
                        "saved back to --adapter (a new file when it does not exist)")
    g.add_argument("--adapt-seq-len", type=int_in(1, 65536), default=128,
                   help="tokens an online window predicts")
    g.add_argument("--adapt-directions", type=int_in(1, 4096), default=d.directions,
                   help="tangent directions per online update")
    g.add_argument("--adapt-lr", type=float_in(0.0, 10.0, open_low=True), default=d.lr,
                   help="learning rate of the online updates")
