"""The training loop shared by every stage (SPEC §4).

    result = train(cfg, run_dir, data=["corpus/"], init_from=None)

Run directory: config.yaml (resolved), tokenizer, data/<hash>/ token files,
checkpoints/ (orbax), metrics.jsonl, tb/. A run with checkpoints resumes from
the latest one exactly (params, optimizer, step, data position); SIGINT/SIGTERM
save a checkpoint and stop; K non-finite steps in a row stop the run with the
last good checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.config import PerspectiveConfig, to_dict
from perspective_jax.data.corpus import (default_corpus_files, expand_paths,
                                         read_documents, split_documents)
from perspective_jax.data.pipeline import eval_batches, train_iterator
from perspective_jax.data.token_store import build_token_store, check_long_enough
from perspective_jax.data.tokenizer import copy_tokenizer, load_or_train
from perspective_jax.errors import UserError
from perspective_jax.model.generate import Sampling, generate
from perspective_jax.model.transformer import abstract_params, logical_axes
from perspective_jax.moe.metrics import routing_report
from perspective_jax.train import sharding as shd
from perspective_jax.rundir.checkpoint import Checkpointer, restore_params
from perspective_jax.rundir.layout import (CONFIG_FILE, config_path, has_config, load_run_config,
                                           save_run_config)
from perspective_jax.train.metrics import MetricsLogger, progress_bar
from perspective_jax.train.objective import (effective_params, expert_activation_bits,
                                             make_apply_fns)
from perspective_jax.train.step import (init_state, lr_schedule, make_eval_step,
                                        make_optimizer, make_train_step)

MAX_NONFINITE_IN_A_ROW = 5
SAMPLE_PROMPT_TOKENS = 16
SAMPLE_NEW_TOKENS = 48


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


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum, _frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _shape_signature(cfg: PerspectiveConfig) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(abstract_params(cfg.model, cfg.moe))[0]
    return {jax.tree_util.keystr(p): (tuple(a.shape), str(a.dtype)) for p, a in leaves}


def _shape_changes(saved: PerspectiveConfig, cfg: PerspectiveConfig) -> Optional[str]:
    """None if both configs give the same parameter shapes, else the model.*/moe.*
    values that differ ('model.d_model: 32 -> 48; ...')."""
    if _shape_signature(saved) == _shape_signature(cfg):
        return None
    changed = []
    for section in ("model", "moe"):
        old, new = getattr(saved, section), getattr(cfg, section)
        changed += [f"{section}.{f.name}: {getattr(old, f.name)!r} -> {getattr(new, f.name)!r}"
                    for f in dataclasses.fields(new)
                    if getattr(old, f.name) != getattr(new, f.name)]
    return "; ".join(changed) or "another parameter layout"


def ensure_run_dir(run_dir: str) -> None:
    """Create the run directory, or say in one line why it cannot be used."""
    try:
        os.makedirs(run_dir, exist_ok=True)
    except FileExistsError:
        raise UserError(f"--run-dir {run_dir} is an existing file, not a directory; "
                        "pass a directory path") from None
    except OSError as exc:
        raise UserError(f"--run-dir {run_dir}: cannot create it ({exc.strerror}); "
                        "pass a path in a writable directory") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise UserError(f"--run-dir {run_dir} is not writable; pass another directory")


def source_config(init_from: str) -> PerspectiveConfig:
    """The resolved config of the run that --init-from names."""
    if not os.path.isdir(init_from):
        raise UserError(f"--init-from {init_from}: no such directory; pass the run "
                        "directory of an earlier stage")
    if not os.path.isfile(config_path(init_from)):
        raise UserError(f"--init-from {init_from}: no {CONFIG_FILE}; is it a "
                        "perspective-train run directory?")
    return load_run_config(init_from)


def check_init_compatible(init_from: str, cfg: PerspectiveConfig) -> None:
    """Refuse --init-from a run whose parameters have other shapes than `cfg`'s."""
    changes = _shape_changes(source_config(init_from), cfg)
    if changes:
        raise UserError(f"--init-from {init_from} holds a model of another shape ({changes}); "
                        "use the same model.* and moe.* values as that run")


def check_resume_compatible(saved: PerspectiveConfig, cfg: PerspectiveConfig,
                            run_dir: str) -> None:
    """Refuse a resume whose config changes parameter shapes or the data stream."""
    changes = _shape_changes(saved, cfg)
    if changes:
        raise UserError(f"{run_dir} holds a model of another shape ({changes}); "
                        "resume with the original config, or use a new --run-dir "
                        "(optionally --init-from)")
    for section, keys in (("data", ("seq_len", "tokenizer", "seed", "val_fraction")),
                          ("train", ("batch_size", "grad_accum", "seed"))):
        for key in keys:
            a, b = getattr(getattr(saved, section), key), getattr(getattr(cfg, section), key)
            if a != b:
                raise UserError(f"{run_dir} was trained with {section}.{key}={a!r}; resuming "
                                f"with {b!r} would not continue the same data stream — "
                                "use the original value or a new --run-dir")


def prepare_data(cfg: PerspectiveConfig, run_dir: str, data: Optional[Sequence[str]],
                 tokenizer_from: Optional[str] = None):
    """Corpus → tokenizer (trained or reused) → cached token files."""
    files = expand_paths(data) if data else default_corpus_files()
    docs = read_documents(files)
    train_docs, val_docs = split_documents(docs, cfg.data.val_fraction)
    if tokenizer_from:
        copy_tokenizer(tokenizer_from, run_dir)
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


def train(cfg: PerspectiveConfig, run_dir: str, data: Optional[Sequence[str]] = None,
          init_from: Optional[str] = None, devices=None, progress: bool = True,
          max_steps_this_call: Optional[int] = None,
          deadline_s: Optional[float] = None) -> TrainResult:
    """Train (or resume) the dense model described by `cfg` in `run_dir`.

    `deadline_s` (seconds since this call started) ends training early — with a
    final evaluation and checkpoint — for wall-clock-budgeted benchmarks."""
    t_start = time.perf_counter()
    ensure_run_dir(run_dir)
    saved_cfg = load_run_config(run_dir) if has_config(run_dir) else None
    ckpt = Checkpointer(run_dir, cfg.checkpoint)
    latest = ckpt.latest_step()
    resuming = latest is not None
    if resuming and saved_cfg is not None:
        check_resume_compatible(saved_cfg, cfg, run_dir)
    if init_from and not resuming:
        check_init_compatible(init_from, cfg)
    if resuming and latest >= cfg.train.steps:
        ckpt.close()
        return _already_done(run_dir, latest, cfg.train.steps, t_start)
    save_run_config(cfg, run_dir)
    tokenizer, train_split, val_split = prepare_data(cfg, run_dir, data, init_from)

    mesh = shd.make_mesh(cfg.mesh, devices)
    divisor = shd.batch_divisor(mesh)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % divisor:
        raise UserError(f"micro-batch {micro} (train.batch_size / train.grad_accum) is not "
                        f"divisible by the {divisor} data-parallel shards of the mesh "
                        f"{dict(mesh.shape)}")
    tx = make_optimizer(cfg.train)
    abstract = abstract_params(cfg.model, cfg.moe)
    p_shard = shd.param_shardings(logical_axes(cfg.model, cfg.moe), abstract, mesh)
    train_apply, eval_apply = make_apply_fns(cfg)

    with jax.set_mesh(mesh):
        if init_from and not resuming:
            params = jax.device_put(restore_params(init_from, abstract), p_shard)
        else:
            from perspective_jax.model.transformer import init_params
            params = jax.jit(lambda r: init_params(cfg.model, r, moe=cfg.moe),
                             out_shardings=p_shard)(
                jax.random.key(cfg.train.seed))
        state = jax.jit(lambda p: init_state(p, tx))(params)
        if cfg.ternary.enabled and cfg.ternary.kd_weight > 0:
            if not (init_from or resuming):
                raise UserError("the ternary stage distils from a teacher: pass --init-from "
                                "SPARSE_RUN_DIR")
            # the starting weights, frozen, are the distillation teacher
            state["teacher"] = jax.tree.map(jnp.copy, params)
        state_shard = jax.tree.map(lambda a: a.sharding, state)
        data_iter = train_iterator(train_split.tokens, cfg.data.seq_len, cfg.train.batch_size,
                                   cfg.train.grad_accum, seed=cfg.data.seed + cfg.train.seed,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count())
        counters = {"nonfinite_total": 0}
        if resuming:
            state, meta = ckpt.restore(ckpt.latest_step(), state, data_iter)
            counters["nonfinite_total"] = int(meta.get("nonfinite_total", 0))

        batch_sharding = jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(None, shd.BATCH_AXES, None))
        ce_weight = cfg.ternary.ce_weight if cfg.ternary.enabled else 1.0
        train_step = jax.jit(make_train_step(train_apply, tx, lr_schedule(cfg.train),
                                             ce_weight=ce_weight),
                             in_shardings=(state_shard, batch_sharding),
                             out_shardings=(state_shard, None), donate_argnums=(0,))
        eval_step = jax.jit(make_eval_step(eval_apply))
        used_params = jax.jit(lambda p, step: effective_params(cfg, p, step))
        val_windows = eval_batches(val_split.tokens, cfg.data.seq_len, micro,
                                   cfg.train.eval_batches)
        logger = MetricsLogger(run_dir)
        start = int(state["step"])
        end = cfg.train.steps if max_steps_this_call is None else min(
            cfg.train.steps, start + max_steps_this_call)
        global_shape = (cfg.train.grad_accum, micro, cfg.data.seq_len + 1)
        result = TrainResult(run_dir, start, None, None, None, "", "finished", 0.0)

        def meta():
            return {"config": to_dict(cfg), **counters}

        def evaluate(step):
            total, count, stats = 0.0, 0.0, None
            params_used = used_params(state["params"], state["step"])
            for w in val_windows:
                w = jax.make_array_from_callback(w.shape, shd.batch_sharding(mesh),
                                                 lambda idx, w=w: w[idx])
                s, c, st = eval_step(params_used, w)
                total, count = total + float(s), count + float(c)
                st = jax.tree.map(np.asarray, st)
                stats = st if stats is None else jax.tree.map(np.add, stats, st)
            loss = total / count
            prompt = np.asarray(val_split.tokens[:SAMPLE_PROMPT_TOKENS], np.int32)[None]
            out = generate(cfg.model, params_used, prompt, SAMPLE_NEW_TOKENS,
                           Sampling(temperature=0.8, top_k=40), seed=step, moe=cfg.moe,
                           activation_bits=expert_activation_bits(cfg))
            sample = tokenizer.decode(np.concatenate([prompt[0], out[0]]))
            bpc = loss / math.log(2) / val_split.chars_per_token
            record = {"val_loss": loss, "val_bits_per_token": loss / math.log(2),
                      "val_bits_per_char": bpc, "sample": sample}
            if stats:
                routing = routing_report(stats["counts"], stats["switches"],
                                         stats["entropy"] / len(val_windows))
                record.update({k: v for k, v in routing.items() if k != "utilisation"})
                record["routing"] = routing
                result.routing = routing
            logger.log(step, "eval", record)
            result.val_loss, result.val_bits_per_char, result.sample = loss, bpc, sample
            return loss

        bar = progress_bar(end, start, progress, desc=f"train {cfg.name}")
        in_a_row, window_t, window_steps = 0, time.perf_counter(), 0
        tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        with _StopFlag() as stop:
            for step in range(start, end):
                local = next(data_iter)
                batch = jax.make_array_from_process_local_data(batch_sharding, local,
                                                               global_shape)
                state, m = train_step(state, batch)
                done = step + 1
                window_steps += 1
                if not bool(m["finite"]):
                    in_a_row += 1
                    counters["nonfinite_total"] += 1
                    logger.log(done, "nonfinite", {"loss": float(m["loss"])})
                    if in_a_row >= MAX_NONFINITE_IN_A_ROW:
                        result.stopped = "nonfinite"
                        break
                else:
                    in_a_row = 0
                    if done % cfg.train.log_every == 0 or done == end:
                        loss = float(m["loss"])
                        elapsed = time.perf_counter() - window_t
                        tps = tokens_per_step * window_steps / max(elapsed, 1e-9)
                        logger.log(done, "train", {
                            "tokens_per_s": tps,
                            **{k: float(v) for k, v in m.items() if k != "finite"}})
                        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
                        result.train_loss = loss
                        window_t, window_steps = time.perf_counter(), 0
                    if done % cfg.train.eval_every == 0 or done == cfg.train.steps:
                        bar.write(f"step {done}: val loss {evaluate(done):.4f}")
                    ckpt.save(done, state, data_iter, meta(), force=done == end)
                bar.update(1)
                result.step = done
                if stop.signal is not None:
                    ckpt.save(done, state, data_iter, meta(), force=True)
                    result.stopped = "signal"
                    break
                if deadline_s is not None and time.perf_counter() - t_start > deadline_s:
                    if result.val_loss is None or done % cfg.train.eval_every:
                        evaluate(done)
                    ckpt.save(done, state, data_iter, meta(), force=True)
                    result.stopped = "deadline"
                    break
        if result.val_loss is None and result.stopped != "nonfinite":
            evaluate(result.step)  # e.g. no step reached an evaluation: report one anyway
        bar.close()
        ckpt.close()
        last_good = ckpt.latest_step()
        logger.close()
    result.wall_s = time.perf_counter() - t_start
    if result.stopped == "nonfinite":
        raise UserError(f"{MAX_NONFINITE_IN_A_ROW} non-finite steps in a row ending at step "
                        f"{result.step}; stopped with the last good checkpoint "
                        f"(step {last_good}) intact — lower train.learning_rate")
    return result
