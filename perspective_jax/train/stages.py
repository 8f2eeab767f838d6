"""The curriculum (SPEC §4): dense → upcycle → sparse (→ ternary → align, issue 5), and
the `safety` stage after it (`train.safety_stage`).

    run_stage("all", cfg, "runs/x")   # runs/x/dense, runs/x/upcycle, runs/x/sparse

Each stage is a run directory; a stage that already finished is resumed (and
so skipped), so `--stage all` can be re-run after any interruption. The curriculum
root and the stage in training are locked against a second writer (`rundir.lock`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from perspective_jax.config import PerspectiveConfig
from perspective_jax.config.choices import (CURRICULUM, ROUTED_STAGES, SAFETY_STAGE, STAGES,
                                           TERNARY_STAGES)
from perspective_jax.config.param_layout import map_routed_ffns, routed_ffns
from perspective_jax.data.tokenizer import copy_tokenizer
from perspective_jax.errors import UserError
from perspective_jax.model import footprint
from perspective_jax.moe.align import EXPERT_WEIGHTS
from perspective_jax.model.transformer import abstract_params, init_params, logical_axes
from perspective_jax.rundir.checkpoint import Checkpointer, latest_complete_step, restore_params
from perspective_jax.train.plan import initial_state
from perspective_jax.train.step import make_optimizer
from perspective_jax.rundir.layout import (CONFIG_FILE, has_config, load_run_config,
                                           save_run_config)
from perspective_jax.rundir.lock import hold_run_dir
from perspective_jax.train import distributed as dist
from perspective_jax.train import sharding as shd
from perspective_jax.train.resume import ensure_run_dir, source_config
from perspective_jax.train.trainer import TrainResult, train

ALIGN_STEP_SHARE = 4   # the align fine-tune runs train.steps / 4 steps
# The run each stage starts from (--init-from; a resumed run needs none but upcycle).
NEEDS_SOURCE = {"upcycle": "DENSE_RUN_DIR", "sparse": "UPCYCLE_RUN_DIR",
                "ternary": "SPARSE_RUN_DIR", "align": "TERNARY_RUN_DIR"}
# What --init-from must hold for a trained stage: (routed, ternary) and its wording.
INIT_SOURCES = {"dense": ((False, False), "a dense"),
                "sparse": ((True, False), "an upcycle (or sparse)"),
                "ternary": ((True, False), "a sparse (or upcycle)"),
                "safety": ((True, True), "an align (or ternary)")}


def stage_config(cfg: PerspectiveConfig, stage: str) -> PerspectiveConfig:
    """The config a stage runs with: the FFN after PDR layers is routed from
    upcycle on, and its experts are ternary from the ternary stage on. `align`
    is a short, fully ternary fine-tune without distillation."""
    ternary = dataclasses.replace(cfg.ternary, enabled=stage in TERNARY_STAGES)
    train_cfg = cfg.train
    if stage == "align":
        ternary = dataclasses.replace(ternary, schedule=(1.0,), ce_weight=1.0, kd_weight=0.0)
        steps = max(1, cfg.train.steps // ALIGN_STEP_SHARE)
        train_cfg = dataclasses.replace(cfg.train, steps=steps,
                                        warmup_steps=min(cfg.train.warmup_steps, steps // 4),
                                        eval_every=min(cfg.train.eval_every, steps))
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, routed=stage in ROUTED_STAGES),
        ternary=ternary, train=train_cfg)


def check_memory(stage: str, cfg: PerspectiveConfig, allow: bool = False) -> None:
    """Refuse, before any work, a stage (every stage of 'all') whose memory need exceeds
    what this machine has (`model.footprint`); `allow` (--allow-oversize) overrides.
    Sizes no JAX program can index are refused first, by arithmetic alone."""
    if stage == SAFETY_STAGE:    # forward passes of the source run's model, sized by it
        return
    footprint.check_dimensions(cfg)
    machine = footprint.probe_machine()
    for name in CURRICULUM if stage == "all" else (stage,):
        footprint.refuse_oversize(footprint.train_need(stage_config(cfg, name), name, machine),
                                  machine, allow)


def upcycle_params(dense: dict, routed_init: dict, cfg: PerspectiveConfig,
                   rng: jax.Array) -> dict:
    """Routed params from dense ones: every PDR layer's FFN copied into its E
    experts (+ noise of std moe.upcycle_noise × the weight's std); router, offsets
    and the expert-predictor heads from `routed_init`; every other parameter copied
    unchanged."""
    e = cfg.moe.num_experts
    routers = dict(routed_ffns(routed_init, cfg.model))
    key = [rng]                       # split one after another, as the upcycle always did

    def experts(i, src):
        new = {k: v for k, v in routers[i].items() if k not in EXPERT_WEIGHTS}
        for w in EXPERT_WEIGHTS:
            base = src[w]["kernel"]                                          # [P, a, b]
            stacked = jnp.broadcast_to(base[:, None], (base.shape[0], e, *base.shape[1:]))
            key[0], sub = jax.random.split(key[0])
            noise = jax.random.normal(sub, stacked.shape, stacked.dtype)
            new[w] = stacked + cfg.moe.upcycle_noise * jnp.std(base) * noise
        return new

    out = map_routed_ffns(dense, cfg.model, experts)
    out = {**out, **{k: v for k, v in routed_init.items() if k not in out}}   # heads
    if jax.tree.structure(out) != jax.tree.structure(routed_init):
        raise UserError("upcycle: the dense checkpoint does not match this config's layers")
    return out


def _model_kind(cfg: PerspectiveConfig) -> str:
    if not cfg.model.routed:
        return "a dense model (a dense-stage run)"
    if cfg.ternary.enabled:
        return "a ternary routed model (a ternary or align run)"
    return "a routed model (an upcycle or sparse run)"


def check_init_source(stage: str, init_from: str, run_dir: str) -> None:
    """Refuse --init-from a run of the wrong stage (before any work) unless `run_dir`
    already holds checkpoints, which resuming uses instead."""
    if stage not in INIT_SOURCES or latest_complete_step(run_dir) is not None:
        return
    src = source_config(init_from)
    want, wording = INIT_SOURCES[stage]
    if (src.model.routed, src.ternary.enabled) != want:
        raise UserError(f"--stage {stage} must be initialised from {wording} run; "
                        f"--init-from {init_from} holds {_model_kind(src)}")


def _last_routing(run_dir: str) -> Optional[dict]:
    from perspective_jax.train.metrics import read_metrics
    evals = [r for r in read_metrics(run_dir, "eval") if "routing" in r]
    return evals[-1]["routing"] if evals else None


def upcycle(cfg: PerspectiveConfig, dense_run: str, run_dir: str) -> str:
    """Write `run_dir` holding the upcycled routed model at step 0."""
    if not has_config(dense_run):
        raise UserError(f"upcycle: {dense_run} is not a finished dense run (no {CONFIG_FILE}); "
                        "pass --init-from DENSE_RUN_DIR")
    dense_cfg = load_run_config(dense_run)
    if dense_cfg.model.routed:
        raise UserError(f"upcycle: {dense_run} already holds a routed model")
    cfg = stage_config(cfg, "upcycle")
    want = jax.tree.map(lambda a: (a.shape, a.dtype),
                        abstract_params(dataclasses.replace(cfg.model, routed=False)))
    have = jax.tree.map(lambda a: (a.shape, a.dtype), abstract_params(dense_cfg.model))
    if want != have:
        raise UserError(f"upcycle: {dense_run} was trained with another model shape; use the "
                        "same model.* values as the dense stage")
    ckpt = Checkpointer(run_dir, cfg.checkpoint)
    if ckpt.latest_step() is not None:
        ckpt.close()
        return run_dir                                   # already upcycled
    dense = restore_params(dense_run, abstract_params(dense_cfg.model))
    key = jax.random.key(cfg.train.seed)
    routed_init = init_params(cfg.model, key, moe=cfg.moe)
    params = upcycle_params(dense, routed_init, cfg, jax.random.fold_in(key, 1))
    write_start(cfg, run_dir, dense_run, ckpt, params,
                {"stage": "upcycle", "from": os.path.abspath(dense_run)})
    return run_dir


def write_start(cfg: PerspectiveConfig, run_dir: str, source_run: str, ckpt: Checkpointer,
                params, meta: dict) -> None:
    """A step-0 run from host `params` (the same on every process): tokenizer and
    config written by process 0, the train state saved by every process as global
    arrays laid out by the config's mesh; closes `ckpt`."""
    def records():
        os.makedirs(run_dir, exist_ok=True)
        copy_tokenizer(source_run, run_dir)
        save_run_config(cfg, run_dir)
    dist.on_primary(records)
    mesh = shd.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        shardings = shd.param_shardings(logical_axes(cfg.model, cfg.moe),
                                        abstract_params(cfg.model, cfg.moe), mesh)
        state = initial_state(cfg, make_optimizer(cfg.train), shd.put_global(params, shardings),
                              mesh)
        ckpt.save(0, state, None, meta, force=True)
    ckpt.close()


def reembed(cfg: PerspectiveConfig, ternary_run: str, out_dir: str) -> dict:
    """Write `out_dir` (a step-0 run) holding the ternary model with its experts
    permuted onto the lattice cells MDS assigns them (offsets reset to 0), then, with
    `moe.align_consensus` > 0, near-threshold weights snapped to their lattice
    neighbours' majority trit (`moe.align.consensus_snap`).

    The routers are not permuted: a state routed to cell c before goes to cell c
    after (now holding another expert's weights), so the expert-predictor heads,
    whose classes are the router's cell indices, stay as they are."""
    import numpy as np
    from perspective_jax.moe.align import align_layer, consensus_snap, neighbour_trit_difference
    from perspective_jax.train.objective import effective_params

    if not has_config(ternary_run):
        raise UserError(f"align: {ternary_run} is not a finished ternary run; pass "
                        "--init-from TERNARY_RUN_DIR")
    src = load_run_config(ternary_run)
    if not (src.model.routed and src.ternary.enabled):
        raise UserError(f"align: {ternary_run} does not hold a ternary routed model")
    params = restore_params(ternary_run, abstract_params(src.model, src.moe))
    used = effective_params(src, params, src.train.steps)
    report = {"stress_before": [], "stress_after": [], "trit_difference_before": [],
              "trit_difference_after": [], "consensus_moved": 0}
    margin, granularity = cfg.moe.align_consensus, src.ternary.scale_granularity
    used_ffns = dict(routed_ffns(used, src.model))

    def permuted(i, ffn):
        ffn_used = used_ffns[i]
        new = {n: np.array(ffn[n]) for n in ("w_gate", "w_up", "w_down")}
        for p in range(src.model.n_periods):
            perm, before, after = align_layer({n: ffn_used[n][p] for n in new}, src.moe.lattice)
            for n in new:
                new[n][p] = new[n][p][perm]
                report["trit_difference_before"].append(
                    neighbour_trit_difference(new[n][p], src.moe.lattice, granularity))
                new[n][p], moved = consensus_snap(new[n][p], src.moe.lattice, margin,
                                                  granularity)
                report["consensus_moved"] += moved
                report["trit_difference_after"].append(
                    neighbour_trit_difference(new[n][p], src.moe.lattice, granularity))
            report["stress_before"].append(before)
            report["stress_after"].append(after)
        ffn.update({n: jnp.asarray(v) for n, v in new.items()})
        ffn["router"] = {**ffn["router"],
                         "offsets": jnp.zeros_like(ffn["router"]["offsets"])}
        return ffn

    params = map_routed_ffns(params, src.model, permuted)
    cfg = stage_config(cfg, "align")
    ckpt = Checkpointer(out_dir, cfg.checkpoint)
    if ckpt.latest_step() is None:
        write_start(cfg, out_dir, ternary_run, ckpt, params,
                    {"stage": "align", "from": os.path.abspath(ternary_run), **report})
    else:
        ckpt.close()
    return report


def run_stage(stage: str, cfg: PerspectiveConfig, run_dir: str,
              data: Optional[Sequence[str]] = None, init_from: Optional[str] = None,
              progress: bool = True, log=print,
              resume_from_step: Optional[int] = None) -> Optional[TrainResult]:
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}; use one of {STAGES}")
    if stage == SAFETY_STAGE:
        if jax.process_count() > 1:
            raise UserError(f"--stage {SAFETY_STAGE} runs in one process; start it without "
                            "--coordinator (and outside srun / mpirun)")
        from perspective_jax.train.safety_stage import run_safety_stage
        if init_from:
            check_init_source(stage, init_from, run_dir)
        return run_safety_stage(cfg, run_dir, init_from, data, resume_from_step, log)
    if resume_from_step is not None and stage in ("all", "upcycle"):
        raise UserError(f"--resume-from-step cannot be used with --stage {stage}: pass the "
                        "stage that trains and its own run directory (e.g. --stage sparse "
                        "--run-dir RUN/sparse)")
    if stage == "all" and init_from:
        raise UserError("--init-from cannot be used with --stage all: the curriculum "
                        "initialises each stage from the previous one")
    if stage in NEEDS_SOURCE and not init_from and (
            stage == "upcycle" or latest_complete_step(run_dir) is None):
        raise UserError(f"--stage {stage} needs --init-from {NEEDS_SOURCE[stage]}")
    ensure_run_dir(run_dir)
    if init_from:
        check_init_source(stage, init_from, run_dir)
    with contextlib.ExitStack() as held:  # the curriculum root, or the stage's directory
        dist.on_primary(lambda: held.enter_context(hold_run_dir(run_dir)) and None)
        return _run_stage(stage, cfg, run_dir, data, init_from, progress, log,
                          resume_from_step)


def _run_stage(stage: str, cfg: PerspectiveConfig, run_dir: str,
               data: Optional[Sequence[str]], init_from: Optional[str], progress: bool,
               log, resume_from_step: Optional[int]) -> Optional[TrainResult]:
    """`run_stage` while holding `run_dir`'s lock."""
    if stage == "all":
        result, previous = None, None
        for name in CURRICULUM:
            stage_dir = os.path.join(run_dir, name)
            log(f"== stage {name} -> {stage_dir}")
            result = run_stage(name, cfg, stage_dir, data, previous, progress, log) or result
            if result is not None and result.stopped != "finished":
                return result
            previous = stage_dir
        return result
    if stage == "upcycle":
        upcycle(cfg, init_from, run_dir)
        log(f"upcycled {init_from} into {run_dir} "
            f"({cfg.moe.num_experts} experts per PDR layer)")
        return None
    if stage == "align":
        start = os.path.join(run_dir, "reembedded")
        if init_from:
            rep = reembed(cfg, init_from, start)
            log(f"re-embedded experts by MDS: lattice stress "
                f"{sum(rep['stress_before']) / len(rep['stress_before']):.3f} -> "
                f"{sum(rep['stress_after']) / len(rep['stress_after']):.3f}")
            if rep["consensus_moved"]:
                mean = lambda v: sum(v) / len(v)  # noqa: E731
                log(f"consensus: moved {rep['consensus_moved']} near-threshold weights; "
                    f"neighbour trit difference {mean(rep['trit_difference_before']):.3f} "
                    f"-> {mean(rep['trit_difference_after']):.3f}")
        result = train(stage_config(cfg, "align"), run_dir, data=data, init_from=start,
                       progress=progress, resume_from_step=resume_from_step)
        before = _last_routing(init_from) if init_from else None
        if before and result.routing:
            log(f"neighbour share of adjacent-token switches: "
                f"{before['switch_neighbour']:.3f} (ternary) -> "
                f"{result.routing['switch_neighbour']:.3f} (aligned)")
        return result
    return train(stage_config(cfg, stage), run_dir, data=data, init_from=init_from,
                 progress=progress, resume_from_step=resume_from_step)
