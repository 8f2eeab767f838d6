"""Orbax checkpoints carrying the train state, the grain iterator and metadata.

A checkpoint is a `Composite` of `state` (params, optimizer state, step),
`data_iter` (grain iterator position) and `meta` (JSON: resolved config, seed,
counters). Saves are asynchronous; once orbax reports a step finished, the list of
its files' checksums is written (`rundir.checkpoint_steps`): only a listed step is
complete, and it is verified before any restore. Old steps beyond `keep` are
removed only after a newer step is complete, and a failed save stops the run with
one line (`rundir.checkpoint_failure`), leaving the last complete step intact.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Callable, Optional

import grain
import jax
import orbax.checkpoint as ocp

from perspective_jax.config import CheckpointConfig
from perspective_jax.errors import UserError
from perspective_jax.fileio import disk_error
from perspective_jax.model.routed_ffn import NEXT_TOKEN_PREDICTOR
from perspective_jax.model.transformer import fill_absent_predictors
from perspective_jax.rundir import checkpoint_steps as steps
from perspective_jax.rundir.checkpoint_failure import OrbaxErrorLog, save_failed

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


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def _advice(directory: str, step: int, source: Optional[str]) -> str:
    """What to do about a damaged step: go back to the previous complete one (the
    trainer's own run: re-run with the flag; another run: name its command)."""
    older = [s for s in steps.complete_steps(directory) if s < step]
    run_dir = os.path.dirname(directory)
    if not older:
        path = os.path.join(directory, str(step))
        return (f"move {path} away to start the run afresh" if source is None
                else f"retrain {run_dir} (it holds no earlier complete checkpoint)")
    if source is None:
        return (f"re-run with --resume-from-step {older[-1]} to continue from the previous "
                "complete checkpoint (later ones are moved aside, not deleted)")
    return (f"go back to its step {older[-1]} with perspective-train --run-dir {run_dir} "
            f"--resume-from-step {older[-1]} (and that run's other flags)")


def _damaged(directory: str, step: int, what: str, source: Optional[str]) -> UserError:
    path = os.path.join(directory, str(step))
    head = f"{source} {os.path.dirname(directory)}: " if source else ""
    return UserError(f"{head}the checkpoint at step {step} ({path}) is damaged: {what}; "
                     f"{_advice(directory, step, source)}")


def _unreadable(directory: str, step: int, exc: BaseException,
                source: Optional[str]) -> UserError:
    """The one-line error for a verified checkpoint orbax still cannot read back."""
    while exc.__cause__ is not None:  # the root cause names the damaged file
        exc = exc.__cause__
    reason = " ".join(str(exc).split())
    reason = reason if len(reason) <= 160 else reason[:157] + "..."
    path = os.path.join(directory, str(step))
    head = f"{source} {os.path.dirname(directory)}: " if source else ""
    return UserError(f"{head}the checkpoint at step {step} ({path}) matches its checksums "
                     f"but cannot be read back ({reason or type(exc).__name__}); "
                     f"{_advice(directory, step, source)}")


def latest_complete_step(run_dir: str) -> Optional[int]:
    """Step of the newest complete (listed) checkpoint under `run_dir/checkpoints`, or
    None. A step being written, or finalised but never listed, is not counted. Reads
    only the directory listing; restores verify the step's files."""
    complete = steps.complete_steps(os.path.join(run_dir, CHECKPOINT_DIR))
    return complete[-1] if complete else None


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a live pytree, for restoring into."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        tree)


def _tree_bytes(tree) -> int:
    return sum(int(getattr(a, "nbytes", 0)) for a in jax.tree.leaves(tree))


def adopt_unlisted(directory: str, log: Callable[[str], None] = _note) -> None:
    """List the steps orbax finalised (renamed to their bare number: every file
    written) whose checksum list is missing — the process stopped between the two,
    or the run predates the lists. Nothing is lost, and resume stays exact; only
    damage before this moment would go unseen. Process 0 only."""
    unlisted = steps.unlisted_steps(directory)
    for step in unlisted:
        steps.record(os.path.join(directory, str(step)), step)
    if unlisted:
        log(f"checkpoint step(s) {', '.join(map(str, unlisted))} in {directory} "
            "had no checksum list (saved by an older version, or the process stopped "
            "before listing them); listed them now")


def select_resume_step(directory: str, requested: Optional[int] = None,
                       log: Callable[[str], None] = _note) -> Optional[int]:
    """The verified step to resume from: the latest complete one, or `requested`
    (--resume-from-step), in which case later steps are moved aside. Works on the
    directory alone (no orbax manager), so process 0 can decide before the others
    open it."""
    complete = steps.complete_steps(directory)
    if requested is None:
        if complete:
            _verify(directory, complete[-1])
        return complete[-1] if complete else None
    if requested not in complete:
        have = ", ".join(map(str, complete)) or "none"
        raise UserError(f"--resume-from-step {requested}: {directory} holds no "
                        f"complete checkpoint at that step (complete steps: {have})")
    _verify(directory, requested)
    later = sorted(s for s in steps.step_dirs(directory) if s > requested)
    if later:
        dest = steps.set_aside(directory, later)
        log(f"--resume-from-step {requested}: moved the later checkpoint step(s) "
            f"{', '.join(map(str, later))} to {dest} (delete them there when no longer "
            "needed)")
    return requested


def _verify(directory: str, step: int) -> None:
    what = steps.problem(os.path.join(directory, str(step)), step)
    if what:
        raise _damaged(directory, step, what, None)


class Checkpointer:
    """Saves every `every` steps (asynchronously when `async_save`), lists each step
    once orbax has finished it, keeps the newest `keep` complete steps."""

    def __init__(self, run_dir: str, cfg: CheckpointConfig,
                 log: Callable[[str], None] = _note, adopt: bool = True):
        self.every, self.keep, self.async_save = cfg.every, cfg.keep, cfg.async_save
        self.directory = os.path.abspath(os.path.join(run_dir, CHECKPOINT_DIR))
        self.log = log
        self._pending: list[int] = []        # saved, not yet listed
        self._verified: set[int] = set()     # verified by this process (resume, restore)
        self._closed = False
        self._need = 0                       # bytes a save needs (for a full disk)
        self._primary = jax.process_index() == 0
        if adopt and self._primary:
            adopt_unlisted(self.directory, log)
        self.errors = OrbaxErrorLog()
        # Step directories are made before `save` returns: made asynchronously, a
        # failure to make them leaves the grain item waiting for a signal (20 min).
        # Every process makes the manager (its constructor is a barrier).
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, enable_async_checkpointing=cfg.async_save, create=True,
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        # The complete steps as every process sees them: read once after that barrier
        # (process 0 has listed and chosen), then kept in step with the saves, so that
        # all processes delete the same old steps.
        self._complete = steps.complete_steps(self.directory)

    def latest_step(self) -> Optional[int]:
        return self._complete[-1] if self._complete else None

    def verify(self, step: int) -> None:
        """Check step `step` against its list; a UserError names the damaged file."""
        if step in self._verified:
            return
        _verify(self.directory, step)
        self._verified.add(step)

    def select_resume_step(self, requested: Optional[int] = None) -> Optional[int]:
        """The verified step to resume from: the latest complete one, or `requested`
        (--resume-from-step), in which case later steps are moved aside."""
        step = select_resume_step(self.directory, requested, self.log)
        if step is not None:
            self._verified.add(step)
        self._complete = steps.complete_steps(self.directory)
        self.manager.reload()
        return step

    def save(self, step: int, state, data_iter, meta: dict, force: bool = False) -> bool:
        if not force and step % self.every:
            self.poll()
            return False
        self.settle()
        if step in self.manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        self._need = self._need or _tree_bytes(state)
        try:
            started = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as exc:  # orbax/tensorstore raise many kinds
            raise self._failed(step, exc) from None
        if started:
            self._pending.append(step)
            if not self.async_save:
                self.settle()
        return started

    def poll(self) -> None:
        """List the steps whose asynchronous save has finished (non-blocking)."""
        if self._pending and not self.manager.is_saving_in_progress():
            self.settle()

    def settle(self) -> None:
        """Wait for the save in flight, list every finished step, drop old ones."""
        if not self._pending:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as exc:
            raise self._failed(self._pending[-1], exc) from None
        for step in self._pending:
            step_dir = os.path.join(self.directory, str(step))
            if not os.path.isdir(step_dir):         # orbax logged the failure, raised none
                raise self._failed(step, None)
            if self._primary:
                try:
                    self._need = steps.record(step_dir, step)
                except UserError as exc:
                    raise self._failed(step, exc) from None
            self._complete = sorted({*self._complete, step})
        self._pending = []
        # every process deletes (orbax removes the files on process 0, then waits for all)
        for old in self._complete[:-self.keep]:
            try:
                self.manager.delete(old)
            except OSError as exc:
                raise disk_error(exc, os.path.join(self.directory, str(old))) from None
            self._complete.remove(old)

    def _failed(self, step: int, exc: Optional[BaseException]) -> UserError:
        """Give up on the manager (quietly) and build the one-line error."""
        self._pending, self._closed = [], True
        with _quiet_logs(), contextlib.suppress(Exception):
            self.manager.close()
        # The filter stays: orbax's worker threads go on logging this failure after
        # the manager is closed, and the run is over anyway.
        return save_failed(os.path.join(self.directory, str(step)), exc, self.errors,
                           self._need, self.latest_step())

    def restore(self, step: int, state_like, data_iter=None) -> tuple[Any, dict]:
        self.verify(step)
        items = {"state": ocp.args.StandardRestore(abstract_like(state_like)),
                 "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            with _quiet_logs():
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as exc:  # damaged files: orbax/tensorstore raise many kinds
            if _predates_predictors(exc):
                raise UserError(
                    f"{os.path.dirname(self.directory)} was saved before routed models had "
                    "expert-predictor heads, so this version cannot resume it; finish it "
                    "with the version that wrote it, or start the next stage from it "
                    "(--init-from: the heads then start fresh)") from None
            raise _unreadable(self.directory, step, exc, None) from None
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        self.settle()

    def close(self) -> None:
        if self._closed:
            return
        self.settle()
        self._closed = True
        self.manager.close()
        self.errors.remove()
        if self.errors.count:
            self.log(self.errors.summary("while saving checkpoints"))


def complete_step(run_dir: str, source: str) -> tuple[str, int]:
    """(checkpoint directory, newest complete step) of another run, or a one-line
    UserError naming `source` (the flag that gave `run_dir`) and what to do."""
    directory = os.path.abspath(os.path.join(run_dir, CHECKPOINT_DIR))
    if not os.path.isdir(directory):
        raise UserError(f"{source} {run_dir}: no checkpoints/ directory; is it a "
                        "perspective-train run?")
    complete = steps.complete_steps(directory)
    if not complete and steps.unlisted_steps(directory):
        raise UserError(f"{source} {run_dir}: its checkpoints have no checksum lists (saved "
                        "by an older version, or stopped before listing); re-run its "
                        "perspective-train command once to list them")
    if not complete:
        raise UserError(f"{source} {run_dir}: the run has no complete checkpoint yet; "
                        f"train it first (perspective-train --run-dir {run_dir} ...)")
    return directory, complete[-1]


def restore_params(run_dir: str, params_like, source: str = "--init-from") -> Any:
    """Params of the latest complete checkpoint of another run, verified first.
    `source` names how the caller got `run_dir` (a flag) for its error messages."""
    directory, step = complete_step(run_dir, source)
    what = steps.problem(os.path.join(directory, str(step)), step)
    if what:
        raise _damaged(directory, step, what, source)
    # Restore only the params subtree onto one device (callers reshard); the
    # optimizer state of the source run is dropped. PyTreeRestore reads shardings
    # from `restore_args`, not from `item`: without them orbax falls back to the
    # source run's sharding file (and warns), which may name devices not present.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {"params": jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), params_like)}
    manager = ocp.CheckpointManager(directory)
    try:
        with _quiet_logs():
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target, partial_restore=True,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target))))
    except Exception as exc:
        raise _unreadable(directory, step, exc, source) from None
    finally:
        manager.close()
    # a leaf the checkpoint lacks comes back as its ShapeDtypeStruct: expert-predictor
    # heads (a run saved before they existed) start fresh; anything else is an error
    params, absent = fill_absent_predictors(restored["state"]["params"])
    if absent:
        raise UserError(f"{source} {run_dir}: its checkpoint at step {step} lacks "
                        f"{len(absent)} parameters this model has ({', '.join(absent[:3])}"
                        f"{', ...' if len(absent) > 3 else ''}); is it a run of this model?")
    return params


def _predates_predictors(exc: BaseException) -> bool:
    """Whether a failed restore is a train state saved before the predictor heads."""
    text = str(exc)
    return "tree structures do not match" in text and NEXT_TOKEN_PREDICTOR in text
