"""Orbax checkpoints carrying the train state, the grain iterator and metadata.

A checkpoint is a `Composite` of `state` (params, optimizer state, step),
`data_iter` (grain iterator position) and `meta` (JSON: resolved config, seed,
counters). Saves are asynchronous; `latest_step` only sees finalised ones, so a
run killed mid-save resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp

from perspective_jax.config import CheckpointConfig
from perspective_jax.errors import UserError

CHECKPOINT_DIR = "checkpoints"


@contextlib.contextmanager
def _quiet_logs():
    """Silence orbax's (absl) error logs — some from its worker threads — while a
    restore that may fail runs: the caller reports the failure in one line."""
    loggers = [logging.getLogger(name) for name in ("absl", "orbax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _unreadable(directory: str, step: int, exc: BaseException, steps) -> UserError:
    """The one-line error for a checkpoint that exists but cannot be read back."""
    while exc.__cause__ is not None:  # the root cause names the damaged file
        exc = exc.__cause__
    reason = " ".join(str(exc).split())
    reason = reason if len(reason) <= 160 else reason[:157] + "..."
    older = [s for s in steps if s < step]
    then = (f"to resume from step {max(older)}" if older else "to start afresh")
    path = os.path.join(directory, str(step))
    return UserError(f"the checkpoint at step {step} ({path}) is corrupt or unreadable "
                     f"({reason or type(exc).__name__}); delete that directory {then}")


def latest_complete_step(run_dir: str) -> Optional[int]:
    """Step of the newest complete checkpoint under `run_dir/checkpoints`, or None. Orbax
    names a finished checkpoint by its step alone; one still being written carries a
    suffix, so a run killed mid-save is not counted. Reads only the directory listing."""
    directory = os.path.join(run_dir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        return None
    return max((int(n) for n in os.listdir(directory) if n.isdigit()), default=None)


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a live pytree, for restoring into."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        tree)


class Checkpointer:
    def __init__(self, run_dir: str, cfg: CheckpointConfig):
        self.every = cfg.every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True)
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(run_dir, CHECKPOINT_DIR)), options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter, meta: dict, force: bool = False) -> bool:
        if not force and step % self.every:
            return False
        if step in self.manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, state_like, data_iter=None) -> tuple[Any, dict]:
        items = {"state": ocp.args.StandardRestore(abstract_like(state_like)),
                 "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            with _quiet_logs():
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as exc:  # damaged files: orbax/tensorstore raise many kinds
            raise _unreadable(str(self.manager.directory), step, exc,
                              self.manager.all_steps()) from None
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(run_dir: str, params_like) -> Any:
    """Params of the latest checkpoint of another run (for --init-from)."""
    directory = os.path.abspath(os.path.join(run_dir, CHECKPOINT_DIR))
    if not os.path.isdir(directory):
        raise UserError(f"--init-from {run_dir}: no checkpoints/ directory; is it a "
                        "finished perspective-train run?")
    manager = ocp.CheckpointManager(directory)
    step = manager.latest_step()
    if step is None:
        raise UserError(f"--init-from {run_dir}: the run has no complete checkpoint")
    # Restore only the params subtree onto one device (callers reshard); the
    # optimizer state of the source run is dropped. PyTreeRestore reads shardings
    # from `restore_args`, not from `item`: without them orbax falls back to the
    # source run's sharding file (and warns), which may name devices not present.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"params": jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), params_like)}
    try:
        with _quiet_logs():
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target, partial_restore=True,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target))))
    except Exception as exc:
        err = _unreadable(directory, step, exc, manager.all_steps())
        raise UserError(f"--init-from {run_dir}: {err}") from None
    finally:
        manager.close()
    return restored["state"]["params"]
