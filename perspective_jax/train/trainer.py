"""The training loop shared by every stage (SPEC §4).

    result = train(cfg, run_dir, data=["corpus/"], init_from=None)

Run directory: config.yaml (resolved), data.json (the token store it trains on),
tokenizer, data/<hash>/ token files, checkpoints/ (orbax), metrics.jsonl, tb/, and
.lock while a trainer holds it (`rundir.lock`: one writer per directory). A run
with checkpoints resumes exactly (params, optimizer, step, data position) from its
latest complete checkpoint, verified, or from `--resume-from-step N`; SIGINT/SIGTERM
after the first step save a checkpoint and stop; K non-finite steps in a row, or a
failed save, stop the run with the last good checkpoint intact.

`train` = checks (`train.resume`) → `prepare_data` → `setup` (mesh, state, jitted
steps) → `run_loop` (one train step, then the hooks of `train.hooks`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from perspective_jax.config import PerspectiveConfig
from perspective_jax.data.corpus import (default_corpus_files, expand_paths,
                                         read_documents, split_documents)
from perspective_jax.data.pipeline import TrainBatches, eval_batches
from perspective_jax.data.token_store import build_token_store, check_long_enough
from perspective_jax.data.tokenizer import copy_tokenizer, load_or_train
from perspective_jax.errors import UserError
from perspective_jax.model.transformer import abstract_params, logical_axes
from perspective_jax.rundir.checkpoint import (CHECKPOINT_DIR, Checkpointer, adopt_unlisted,
                                               restore_params, select_resume_step)
from perspective_jax.rundir.layout import has_config, load_run_config, save_run_config
from perspective_jax.rundir.lock import hold_run_dir
from perspective_jax.train import distributed as dist
from perspective_jax.train import sharding as shd
from perspective_jax.train.hooks import (MAX_NONFINITE_IN_A_ROW, LoopState, StopFlag,
                                         default_hooks, log_evaluation)
from perspective_jax.train.metrics import MetricsLogger, NullLogger, progress_bar
from perspective_jax.train.objective import effective_params, make_apply_fns
from perspective_jax.train.plan import initial_state
from perspective_jax.train.resume import (check_data_record, check_init_compatible,
                                          check_resume_compatible, check_run_tokenizer,
                                          ensure_run_dir, pin_schedule, source_config)
from perspective_jax.train.step import (lr_schedule, make_eval_step,
                                        make_optimizer, make_train_step)

__all__ = ["TrainResult", "TrainSetup", "train", "prepare_data", "setup", "run_loop",
           "ensure_run_dir", "source_config", "MAX_NONFINITE_IN_A_ROW"]


@dataclasses.dataclass
class TrainResult:
    run_dir: str
    step: int
    train_loss: Optional[float]
    val_loss: Optional[float]
    val_bits_per_char: Optional[float]
    sample: str
    stopped: str  # "finished" | "signal" | "nonfinite" | "deadline"
    wall_s: float
    routing: Optional[dict] = None
    note: str = ""  # e.g. why no step ran in this call


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """The fixed parts of one training call: config, mesh, data, jitted steps,
    checkpointer and logger. Built by `setup`, read by the loop and its hooks."""

    cfg: PerspectiveConfig
    run_dir: str
    mesh: Any
    tokenizer: Any
    val_split: Any
    val_windows: list
    data_iter: Any                 # TrainBatches (its position is the step)
    batch_sharding: Any
    global_shape: tuple            # [grad_accum, micro, seq_len + 1]
    train_step: Any                # (state, batch) -> (state, metrics)
    eval_step: Any                 # (params, windows) -> (Σ nll, count, stats)
    used_params: Any               # (params, step) -> the weights the model uses
    ckpt: Checkpointer
    logger: MetricsLogger
    start: int                     # step of the restored / initial state
    end: int                       # last step of this call
    primary: bool = True           # process 0: logs, progress and files


def data_source(cfg: PerspectiveConfig, data: Optional[Sequence[str]]) -> str:
    """How the corpus is named: --data, else data.path, else the default corpus."""
    if data:
        return "--data " + " ".join(data)
    return f"data.path={cfg.data.path}" if cfg.data.path else "the default corpus"


def corpus_files(cfg: PerspectiveConfig, data: Optional[Sequence[str]]) -> list[str]:
    """The corpus files: --data, else data.path (relative to the current
    directory), else the default corpus."""
    if data:
        return expand_paths(data)
    if cfg.data.path:
        return expand_paths([cfg.data.path], "data.path")
    return default_corpus_files()


def prepare_data(cfg: PerspectiveConfig, run_dir: str, data: Optional[Sequence[str]],
                 tokenizer_from: Optional[str] = None):
    """Corpus → tokenizer (trained or reused) → cached token files."""
    docs = read_documents(corpus_files(cfg, data), cfg.data.binary_files)
    train_docs, val_docs = split_documents(docs, cfg.data.val_fraction)
    if tokenizer_from:
        copy_tokenizer(tokenizer_from, run_dir)
    check_run_tokenizer(run_dir)               # the file the run started with, or refuse
    tokenizer = load_or_train(cfg.data.tokenizer, run_dir, cfg.model.vocab_size,
                              lambda: (d.text for d in train_docs), seed=cfg.data.seed)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but "
                        f"model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size")
    train_split, val_split = build_token_store(run_dir, train_docs, val_docs, tokenizer)
    check_long_enough(train_split, "training", cfg.data.seq_len)
    check_long_enough(val_split, "validation", cfg.data.seq_len)
    return tokenizer, train_split, val_split


def _already_done(run_dir: str, step: int, steps: int, t_start: float) -> TrainResult:
    """The result of a run already at (or past) train.steps: nothing is trained; the
    figures are those its last evaluation logged at this step, if any."""
    from perspective_jax.train.metrics import read_metrics
    try:
        evals = [r for r in read_metrics(run_dir, "eval") if r["step"] == step]
    except (ValueError, KeyError, OSError):  # a damaged metrics.jsonl: no figures
        evals = []
    last = evals[-1] if evals else {}
    return TrainResult(run_dir, step, None, last.get("val_loss"),
                       last.get("val_bits_per_char"), last.get("sample", ""), "finished",
                       time.perf_counter() - t_start, routing=last.get("routing"),
                       note=f"already at step {step} (train.steps={steps}), nothing to "
                            "train (raise train.steps to continue)")


def _initial_state(cfg, tx, p_shard, init_from, resuming, mesh):
    """Train state at step 0 (random init, or --init-from's params), laid out as
    `train.plan.state_layout` says (AdamW's moments sharded like their parameters);
    ternary stages with distillation keep the starting weights, frozen, as teacher."""
    if init_from and not resuming:
        params = shd.put_global(restore_params(init_from, abstract_params(cfg.model, cfg.moe)),
                                p_shard)
    else:
        from perspective_jax.model.transformer import init_params
        params = jax.jit(lambda r: init_params(cfg.model, r, moe=cfg.moe),
                         out_shardings=p_shard)(jax.random.key(cfg.train.seed))
    state = initial_state(cfg, tx, params, mesh)
    if cfg.ternary.enabled and cfg.ternary.kd_weight > 0:
        if not (init_from or resuming):
            raise UserError("the ternary stage distils from a teacher: pass --init-from "
                            "SPARSE_RUN_DIR")
        state["teacher"] = jax.tree.map(jnp.copy, params)
    return state


def setup(cfg: PerspectiveConfig, run_dir: str, mesh, ckpt: Checkpointer, tokenizer,
          train_split, val_split, init_from: Optional[str], resuming: bool,
          max_steps_this_call: Optional[int] = None) -> tuple[TrainSetup, dict, int]:
    """(run, train state, non-finite count so far): the state is initial, or restored
    from the latest checkpoint; the data stream starts at the state's step (one global
    batch per step, this process's rows of it). Call under `jax.set_mesh`."""
    divisor = shd.batch_divisor(mesh)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % divisor:
        raise UserError(f"micro-batch {micro} (train.batch_size / train.grad_accum) is not "
                        f"divisible by the {divisor} data-parallel shards of the mesh "
                        f"{dict(mesh.shape)}")
    tx = make_optimizer(cfg.train)
    p_shard = shd.param_shardings(logical_axes(cfg.model, cfg.moe),
                                  abstract_params(cfg.model, cfg.moe), mesh)
    train_apply, eval_apply = make_apply_fns(cfg)
    state = _initial_state(cfg, tx, p_shard, init_from, resuming, mesh)
    state_shard = jax.tree.map(lambda a: a.sharding, state)
    nonfinite_total = 0
    if resuming:
        state, meta = ckpt.restore(ckpt.latest_step(), state)
        nonfinite_total = int(meta.get("nonfinite_total", 0))
    batch_sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, shd.BATCH_AXES, None))
    global_shape = (cfg.train.grad_accum, micro, cfg.data.seq_len + 1)
    data_iter = TrainBatches(train_split.tokens, cfg.data.seq_len, cfg.train.batch_size,
                             cfg.train.grad_accum, seed=cfg.data.seed + cfg.train.seed,
                             start=int(state["step"]),
                             rows=dist.rows_of_process(batch_sharding, global_shape))
    ce_weight = cfg.ternary.ce_weight if cfg.ternary.enabled else 1.0
    train_step = jax.jit(make_train_step(train_apply, tx, lr_schedule(cfg.train),
                                         ce_weight=ce_weight),
                         in_shardings=(state_shard, batch_sharding),
                         out_shardings=(state_shard, None), donate_argnums=(0,))
    start = int(state["step"])
    end = cfg.train.steps if max_steps_this_call is None else min(
        cfg.train.steps, start + max_steps_this_call)
    run = TrainSetup(
        cfg=cfg, run_dir=run_dir, mesh=mesh, tokenizer=tokenizer, val_split=val_split,
        val_windows=eval_batches(val_split.tokens, cfg.data.seq_len, micro,
                                 cfg.train.eval_batches),
        data_iter=data_iter, batch_sharding=batch_sharding,
        global_shape=global_shape,
        train_step=train_step, eval_step=jax.jit(make_eval_step(eval_apply)),
        used_params=jax.jit(lambda p, step: effective_params(cfg, p, step)),
        ckpt=ckpt, logger=MetricsLogger(run_dir) if dist.is_primary() else NullLogger(),
        start=start, end=end, primary=dist.is_primary())
    return run, state, nonfinite_total


def run_loop(run: TrainSetup, state: dict, nonfinite_total: int, progress: bool,
             deadline_s: Optional[float], t_start: float) -> LoopState:
    """Steps start..end, each followed by the hooks in order; a hook may stop the
    loop. Ends with an evaluation if none ran, then closes checkpointer and log."""
    result = TrainResult(run.run_dir, run.start, None, None, None, "", "finished", 0.0)
    loop = LoopState(state=state, result=result, nonfinite_total=nonfinite_total)
    bar = progress_bar(run.end, run.start, progress and run.primary,
                       desc=f"train {run.cfg.name}")
    with StopFlag() as flag:
        hooks = default_hooks(run.cfg, run.end, bar, flag, deadline_s, t_start)
        for step in range(run.start, run.end):
            batch = jax.make_array_from_process_local_data(
                run.batch_sharding, next(run.data_iter), run.global_shape)
            loop.state, loop.metrics = run.train_step(loop.state, batch)
            loop.done, loop.window_steps = step + 1, loop.window_steps + 1
            loop.finite = bool(loop.metrics["finite"])
            flag.armed = True              # compiled and ran: a signal now saves and stops
            for hook in hooks:
                if hook.due(loop):
                    hook.run(run, loop)
                if loop.stop:
                    break
            if loop.stop:
                result.stopped = loop.stop
                break
        if result.val_loss is None and result.stopped == "finished" and flag.signal is None:
            log_evaluation(run, loop, result.step)  # e.g. no step reached an evaluation
        bar.close()
        run.ckpt.close()                   # waits for the last save
        run.logger.close()
        if flag.signal is not None and result.stopped == "finished":
            result.stopped = "signal"      # arrived after the last step: it is saved
    return loop


def train(cfg: PerspectiveConfig, run_dir: str, data: Optional[Sequence[str]] = None,
          init_from: Optional[str] = None, devices=None, progress: bool = True,
          max_steps_this_call: Optional[int] = None,
          deadline_s: Optional[float] = None,
          resume_from_step: Optional[int] = None) -> TrainResult:
    """Train (or resume) the model described by `cfg` in `run_dir`.

    `data` (files, directories, globs) defaults to `data.path`, then to the
    default corpus. `deadline_s` (seconds since this call started) ends training
    early — with a final evaluation and checkpoint — for wall-clock-budgeted
    benchmarks. A run resumes from its latest complete checkpoint, verified, or
    from `resume_from_step` (later checkpoints are moved aside, not deleted).
    With several processes (`train.distributed`) every process calls this with the
    same arguments; process 0 holds the lock, checks, prepares and writes."""
    t_start = time.perf_counter()
    kept: dict = {}
    with contextlib.ExitStack() as held:
        opened = dist.on_primary(lambda: _open_run(held, kept, cfg, run_dir, data, init_from,
                                                   resume_from_step))
        if opened["done"]:
            return _already_done(run_dir, opened["latest"], opened["steps"], t_start)
        if kept:                                 # process 0
            cfg, tokenizer, train_split, val_split = (kept[k] for k in (
                "cfg", "tokenizer", "train_split", "val_split"))
        else:                                    # the others read what it wrote
            cfg = load_run_config(run_dir)
            tokenizer, train_split, val_split = prepare_data(cfg, run_dir, data)
        result = _train(cfg, run_dir, init_from, devices, progress, max_steps_this_call,
                        deadline_s, t_start, opened["latest"] is not None, tokenizer,
                        train_split, val_split)
        dist.barrier("train-end")                # every checkpoint listed before anyone goes on
        return result


def _open_run(held: contextlib.ExitStack, kept: dict, cfg, run_dir, data, init_from,
              resume_from_step) -> dict:
    """Process 0: take the run directory, choose the step to resume from, check the
    config against the run's, prepare the data and write the run's records. Returns
    {"latest": step or None, "done": already at train.steps, "steps": …}; the
    config, tokenizer and splits are left in `kept`."""
    ensure_run_dir(run_dir)
    held.enter_context(hold_run_dir(run_dir))
    saved_cfg = load_run_config(run_dir) if has_config(run_dir) else None
    directory = f"{run_dir}/{CHECKPOINT_DIR}"
    adopt_unlisted(directory)
    latest = select_resume_step(directory, resume_from_step)
    resuming = latest is not None
    if resuming and saved_cfg is not None:
        check_resume_compatible(saved_cfg, cfg, run_dir)
    cfg = pin_schedule(cfg, saved_cfg if resuming else None, run_dir)
    if init_from and not resuming:
        check_init_compatible(init_from, cfg)
    if resuming and latest >= cfg.train.steps:
        return {"latest": latest, "done": True, "steps": cfg.train.steps}
    tokenizer, train_split, val_split = prepare_data(cfg, run_dir, data, init_from)
    check_data_record(run_dir, train_split.store, data_source(cfg, data), resuming)
    save_run_config(cfg, run_dir)
    kept.update(cfg=cfg, tokenizer=tokenizer, train_split=train_split, val_split=val_split)
    return {"latest": latest, "done": False, "steps": cfg.train.steps}


def _train(cfg, run_dir, init_from, devices, progress, max_steps_this_call, deadline_s,
           t_start, resuming, tokenizer, train_split, val_split) -> TrainResult:
    """`train` once the run is open: mesh, state, loop (every process)."""
    ckpt = Checkpointer(run_dir, cfg.checkpoint, adopt=False)
    mesh = shd.make_mesh(cfg.mesh, devices)
    with jax.set_mesh(mesh):
        run, state, nonfinite_total = setup(cfg, run_dir, mesh, ckpt, tokenizer, train_split,
                                            val_split, init_from, resuming,
                                            max_steps_this_call)
        loop = run_loop(run, state, nonfinite_total, progress, deadline_s, t_start)
        last_good = ckpt.latest_step()
    result = loop.result
    result.wall_s = time.perf_counter() - t_start
    if result.stopped == "nonfinite":
        raise UserError(f"{MAX_NONFINITE_IN_A_ROW} non-finite steps in a row ending at step "
                        f"{result.step}; stopped with the last good checkpoint "
                        f"(step {last_good}) intact — lower train.learning_rate")
    return result
