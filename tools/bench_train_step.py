"""Time one jitted training step (forward + backward + AdamW) of a config, dense
and routed, and print a table: ms per step, training tokens/s, ratio to the first
arm, MFU.

The step is the trainer's own (`train.step.make_train_step` over
`train.objective.make_apply_fns`), on random tokens of the config's batch and
sequence length; compile time is excluded (one warm-up call). `--stages
dense,sparse` picks the arms (`sparse` is the routed step the curriculum trains
after upcycling; `ternary` adds the STE), `--arm "LABEL:STAGE:k=v;k=v"` adds
more. All arms are timed round-robin in one process, so that a busy moment of a
shared machine hits them alike; `--stat min` reports each arm's fastest call.

    .venv/bin/python tools/bench_train_step.py [--config C] [--stages dense,sparse]
        [--repeats 20] [--stat median|min] [--peak-tflops P] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

from perspective_jax.cli.allocator import ensure_fast_allocator

if __name__ == "__main__":
    ensure_fast_allocator()         # before JAX starts (cli/allocator.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchlib import REPO, matmul_peak_gflops  # noqa: E402

from perspective_jax.cli.allocator import describe_allocator  # noqa: E402
from perspective_jax.config import load_config  # noqa: E402
from perspective_jax.model.census import summary, train_flops_per_token  # noqa: E402
from perspective_jax.model.transformer import init_params  # noqa: E402
from perspective_jax.train.objective import make_apply_fns  # noqa: E402
from perspective_jax.train.stages import stage_config  # noqa: E402
from perspective_jax.train.step import init_state, lr_schedule, make_optimizer, \
    make_train_step  # noqa: E402


def compiled_step(cfg):
    """(step(state, batch) -> loss, state, batch) of `cfg`: the trainer's step, jitted."""
    params = init_params(cfg.model, jax.random.key(0), moe=cfg.moe)
    tx = make_optimizer(cfg.train)
    state = init_state(params, tx)
    train_apply, _ = make_apply_fns(cfg)
    step = jax.jit(make_train_step(train_apply, tx, lr_schedule(cfg.train),
                                   cfg.ternary.ce_weight if cfg.ternary.enabled else 1.0))
    accum = max(1, cfg.train.grad_accum)
    batch = jax.random.randint(jax.random.key(1), (accum, cfg.train.batch_size // accum,
                                                   cfg.data.seq_len + 1), 0,
                               cfg.model.vocab_size, jnp.int32)
    if cfg.ternary.enabled:
        state["teacher"] = params

    def run(state, batch):
        return step(state, batch)[1]["loss"]
    jax.block_until_ready(run(state, batch))                     # compile
    return run, state, batch


def interleaved_ms(arms, repeats: int, stat=statistics.median, faults=None) -> list[float]:
    """`stat` (median) of each arm's step ms, timed round-robin (one call of each arm
    per round) so that a busy moment of a shared machine hits every arm alike.
    `faults` (a list) receives each arm's mean minor page faults per call."""
    times = [[] for _ in arms]
    minflt = [0] * len(arms)
    for _ in range(repeats):
        for i, (run, state, batch) in enumerate(arms):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            jax.block_until_ready(run(state, batch))
            times[i].append((time.perf_counter() - t0) * 1e3)
            minflt[i] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    if faults is not None:
        faults[:] = [m / repeats for m in minflt]
    return [stat(t) for t in times]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(REPO, "curricula", "shakespeare-char.yaml"))
    p.add_argument("--stages", default="dense,sparse")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="per-arm statistic of the timed calls (min: least disturbed by "
                        "a shared machine)")
    p.add_argument("--arm", action="append", default=[], metavar="LABEL:STAGE:K=V;K=V",
                   help="an extra arm: a stage with overrides of its own (repeatable)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="MFU denominator (e.g. the device's datasheet peak for the dtype); "
                        "default: a measured XLA matmul of the config's dtype")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    specs = [(stage, stage, []) for stage in a.stages.split(",") if stage]
    for arm in a.arm:
        label, stage, extra = (arm.split(":", 2) + ["", ""])[:3]
        specs.append((label, stage or "dense", [o for o in extra.split(";") if o]))
    cfgs = [(label, stage_config(load_config(a.config, a.overrides + extra), stage))
            for label, stage, extra in specs]
    arms = [compiled_step(cfg) for _, cfg in cfgs]
    dtype = jnp.dtype(cfgs[0][1].model.dtype)
    peak = a.peak_tflops * 1e3 or matmul_peak_gflops(
        4096 if jax.default_backend() != "cpu" else 2048, dtype=dtype)
    faults = []
    times = interleaved_ms(arms, a.repeats, statistics.median if a.stat == "median" else min,
                           faults)
    rows = []
    for (label, cfg), ms, flt in zip(cfgs, times, faults):
        tokens = cfg.train.batch_size * cfg.data.seq_len
        tps = tokens / ms * 1e3
        mfu = tps * train_flops_per_token(cfg.model, cfg.data.seq_len) / (peak * 1e9)
        rows.append((label, summary(cfg.model, cfg.moe)["active_params_per_token"], ms,
                     tps, mfu, flt))
    print(f"\nTraining step, {os.path.relpath(a.config, REPO)} {' '.join(a.overrides)} "
          f"(jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} cores, "
          f"allocator: {describe_allocator()})\n")
    print(f"| arm | active params | ms / step ({a.stat} of {a.repeats}) | train tok/s "
          f"| ÷ first | MFU | page faults / step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for stage, active, ms, tps, mfu, flt in rows:
        print(f"| {stage} | {active / 1e6:.2f}M | {ms:.1f} | {tps:,.0f} "
              f"| {ms / rows[0][2]:.2f}× | {mfu:.1%} | {flt:,.0f} |")
    print(f"\nMFU: model FLOPs (3 × forward, `census.train_flops_per_token`) per second ÷ "
          f"{'given' if a.peak_tflops else 'measured ' + str(dtype) + ' matmul'} peak "
          f"{peak:,.0f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
