"""Periodic actions of the training loop as small hook objects (Levanter-style).

    for hook in hooks:                  # after every train step, in order
        if hook.due(loop) : hook.run(run, loop)
        if loop.stop      : break       # e.g. "signal", "deadline", "nonfinite"

A hook is due every `every` steps and at step `last`; `finite_only` hooks skip
steps whose loss or gradient was not finite. Hooks read the run's fixed parts
(`TrainSetup` in `train.trainer`) and change only the `LoopState`.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any, Optional

from perspective_jax.config import to_dict
from perspective_jax.train.distributed import any_process
from perspective_jax.train.evaluate import evaluate

MAX_NONFINITE_IN_A_ROW = 5


@dataclasses.dataclass
class LoopState:
    """What changes from step to step: the train state, the step just done, its
    metrics and finiteness, counters and the result reported at the end."""

    state: dict
    result: Any                          # train.trainer.TrainResult
    nonfinite_total: int = 0
    done: int = 0                        # steps completed
    metrics: Optional[dict] = None
    finite: bool = True
    in_a_row: int = 0                    # non-finite steps in a row
    window_t: float = dataclasses.field(default_factory=time.perf_counter)
    window_steps: int = 0                # steps since the last train log
    stop: Optional[str] = None           # why the loop stops: signal|deadline|nonfinite


def checkpoint_meta(run, loop: LoopState) -> dict:
    """The JSON saved beside the state: resolved config and counters."""
    return {"config": to_dict(run.cfg), "nonfinite_total": loop.nonfinite_total,
            "data_position": loop.done}


def save_checkpoint(run, loop: LoopState, force: bool) -> None:
    """Every process saves (orbax writes each one's shards); the data position is the
    step, so no iterator state is saved (a resume may use another process count)."""
    run.ckpt.save(loop.done, loop.state, None, checkpoint_meta(run, loop), force=force)


def log_evaluation(run, loop: LoopState, step: int) -> float:
    """Evaluate, log an "eval" record at `step`, keep its figures in the result."""
    record = evaluate(run, loop.state, step)
    result = loop.result
    if "routing" in record:
        result.routing = record["routing"]
    run.logger.log(step, "eval", record)
    result.val_loss, result.val_bits_per_char = record["val_loss"], record["val_bits_per_char"]
    result.sample = record["sample"]
    return record["val_loss"]


class Hook:
    every: int = 1
    last: Optional[int] = None
    finite_only: bool = True

    def due(self, loop: LoopState) -> bool:
        if self.finite_only and not loop.finite:
            return False
        return loop.done % self.every == 0 or loop.done == self.last

    def run(self, run, loop: LoopState) -> None:
        raise NotImplementedError


class NonFiniteHook(Hook):
    """Count non-finite steps (logged); `limit` in a row stop the run."""
    finite_only = False

    def __init__(self, limit: int = MAX_NONFINITE_IN_A_ROW):
        self.limit = limit

    def run(self, run, loop):
        if loop.finite:
            loop.in_a_row = 0
            return
        loop.in_a_row += 1
        loop.nonfinite_total += 1
        run.logger.log(loop.done, "nonfinite", {"loss": float(loop.metrics["loss"])})
        if loop.in_a_row >= self.limit:
            loop.stop = "nonfinite"


class TrainLogHook(Hook):
    """A "train" record (metrics + tokens/s since the last one) every N steps."""

    def __init__(self, every: int, last: int, tokens_per_step: int, bar):
        self.every, self.last, self.tokens_per_step, self.bar = every, last, tokens_per_step, bar

    def run(self, run, loop):
        m = loop.metrics
        loss = float(m["loss"])
        elapsed = time.perf_counter() - loop.window_t
        tps = self.tokens_per_step * loop.window_steps / max(elapsed, 1e-9)
        run.logger.log(loop.done, "train", {
            "tokens_per_s": tps, **{k: float(v) for k, v in m.items() if k != "finite"}})
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
        loop.result.train_loss = loss
        loop.window_t, loop.window_steps = time.perf_counter(), 0


class EvalHook(Hook):
    """Validation loss, routing report and a sample every N steps and at the end."""

    def __init__(self, every: int, last: int, bar):
        self.every, self.last, self.bar = every, last, bar

    def run(self, run, loop):
        loss = log_evaluation(run, loop, loop.done)
        if run.primary:
            self.bar.write(f"step {loop.done}: val loss {loss:.4f}")


class CheckpointHook(Hook):
    """Offer every finite step to the checkpointer (it saves each `checkpoint.every`);
    the last step of this call is always saved."""

    def __init__(self, last: int):
        self.last = last

    def run(self, run, loop):
        save_checkpoint(run, loop, force=loop.done == self.last)


class ProgressHook(Hook):
    """Advance the progress bar and the reported step."""
    finite_only = False

    def __init__(self, bar):
        self.bar = bar

    def run(self, run, loop):
        self.bar.update(1)
        loop.result.step = loop.done


class SignalHook(Hook):
    """After SIGINT/SIGTERM (see `StopFlag`): save a checkpoint and stop. With several
    processes, a signal to any of them stops all at the same step."""
    finite_only = False

    def __init__(self, flag: "StopFlag"):
        self.flag = flag

    def run(self, run, loop):
        if any_process(self.flag.signal is not None):
            save_checkpoint(run, loop, force=True)
            loop.stop = "signal"


class DeadlineHook(Hook):
    """Past `deadline_s` seconds since `t_start`: evaluate (unless this step just
    did), save a checkpoint and stop."""
    finite_only = False

    def __init__(self, deadline_s: Optional[float], t_start: float, eval_every: int):
        self.deadline_s, self.t_start, self.eval_every = deadline_s, t_start, eval_every

    def due(self, loop):
        return self.deadline_s is not None and any_process(
            time.perf_counter() - self.t_start > self.deadline_s)

    def run(self, run, loop):
        if loop.result.val_loss is None or loop.done % self.eval_every:
            log_evaluation(run, loop, loop.done)
        save_checkpoint(run, loop, force=True)
        loop.stop = "deadline"


class StopFlag:
    """Turns SIGINT/SIGTERM into `signal`, which `SignalHook` checks after each step.

    Under a CLI's signal watcher (`cli.common.SignalWatcher`) each signal is offered
    to `take_signal`: once `armed` (the loop's first step ran, so compiling is done
    and there is progress to save) the first one is taken and the loop saves and
    stops; before that, and for a second signal, the watcher ends the process at
    once. Without a watcher the handler only sets the flag."""

    def __init__(self):
        self.signal: Optional[int] = None
        self.armed = False
        self.offered = 0
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def take_signal(self, signum: int) -> bool:
        """Called from the watcher thread: True when the loop will save and stop."""
        self.offered += 1
        if self.armed and self.offered == 1:
            self.signal = signum
            return True
        return False

    def _handle(self, signum, _frame):
        if self.signal is None:
            self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def default_hooks(cfg, end: int, bar, flag: StopFlag, deadline_s: Optional[float],
                  t_start: float) -> list[Hook]:
    """The loop's hooks in the order they run after a step."""
    return [NonFiniteHook(),
            TrainLogHook(cfg.train.log_every, end, cfg.train.batch_size * cfg.data.seq_len, bar),
            EvalHook(cfg.train.eval_every, cfg.train.steps, bar),
            CheckpointHook(end),
            ProgressHook(bar),
            SignalHook(flag),
            DeadlineHook(deadline_s, t_start, cfg.train.eval_every)]
