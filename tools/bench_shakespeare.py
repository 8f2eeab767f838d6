"""Character-level TinyShakespeare under a wall-clock budget (issue 3 benchmark).

Trains the `curricula/shakespeare-char.yaml` dense model (byte tokenizer, the
corpus's last 10 % as validation) with `perspective_jax.train.trainer.train`,
stopping at --budget-s seconds of wall-clock counted from the start of the
run (tokenising, compiling and evaluating included), then prints a table:
validation loss in nats/char, steps, training tokens/s and model-FLOPs
utilisation against this machine's measured float32 matmul peak.

    .venv/bin/python tools/bench_shakespeare.py [--budget-s 150] [key=value ...]

The peer (PyTorch nanoGPT at the same size) is measured outside the repository,
on the same machine and day, with the commands in docs/benchmarks.md
("Training throughput against nanoGPT"); this script prints our side and checks
it against the issue-19 targets taken from the peer: training tokens/s at least
nanoGPT's, and val loss at most nanoGPT's best arm, within the budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

from perspective_jax.cli.allocator import ensure_fast_allocator  # noqa: E402

if __name__ == "__main__":
    ensure_fast_allocator()         # before JAX starts (cli/allocator.py)

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchlib import add_shakespeare_args, load_shakespeare_config, matmul_peak_gflops  # noqa: E402

from perspective_jax.cli.allocator import describe_allocator  # noqa: E402
from perspective_jax.model.census import summary, train_flops_per_token  # noqa: E402
from perspective_jax.train.metrics import read_metrics  # noqa: E402
from perspective_jax.train.trainer import train  # noqa: E402

BUDGET_S = 150.0
# Issue 19's targets (nanoGPT, same size, same 2-core machine; docs/benchmarks.md).
TARGET_VAL_LOSS = 1.66
TARGET_TOKENS_PER_S = 27_700


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shakespeare_args(p, budget_s=BUDGET_S)
    p.add_argument("--run-dir", help="keep the run here (default: a temporary directory)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    cfg = load_shakespeare_config(args)
    if cfg is None:
        return 2
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="bench-shakespeare-")
    if args.run_dir is None or not os.path.exists(os.path.join(run_dir, "checkpoints")):
        shutil.rmtree(run_dir, ignore_errors=True)

    peak = matmul_peak_gflops()
    t0 = time.time()
    result = train(cfg, run_dir, data=[args.data], progress=sys.stderr.isatty(),
                   deadline_s=args.budget_s)
    wall = time.time() - t0
    train_log = read_metrics(run_dir, "train")
    evals = read_metrics(run_dir, "eval")
    steady = [r["tokens_per_s"] for r in train_log[1:]] or [r["tokens_per_s"] for r in train_log]
    tps = sorted(steady)[len(steady) // 2]
    flops = train_flops_per_token(cfg.model, cfg.data.seq_len)
    nats_per_char = result.val_bits_per_char * math.log(2)
    mfu = tps * flops / (peak * 1e9)
    row = {
        "config": os.path.relpath(args.config, REPO), "overrides": args.overrides,
        "params": summary(cfg.model)["total_params"], "steps": result.step,
        "tokens": result.step * cfg.train.batch_size * cfg.data.seq_len,
        "wall_s": wall, "val_loss_nats_per_char": nats_per_char,
        "val_bits_per_char": result.val_bits_per_char, "train_tokens_per_s": tps,
        "train_gflops_per_token": flops / 1e9, "matmul_peak_gflops": peak, "mfu": mfu,
        "curve": [(r["step"], round(r["time"] - t0, 1), round(r["val_loss"], 4)) for r in evals],
    }
    print(f"\nTinyShakespeare, character level, {args.budget_s:.0f} s budget "
          f"(jax {jax.__version__}, {os.cpu_count()} CPU cores, allocator: "
          f"{describe_allocator()})\n")
    print("| model | params | steps | wall s | val loss (nats/char) | train tok/s | MFU |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| Perspective dense ({row['config']}) | {row['params'] / 1e6:.2f}M | {row['steps']} "
          f"| {wall:.0f} | {nats_per_char:.3f} | {tps:,.0f} | {mfu:.1%} |")
    print(f"\nmatmul peak {peak:.0f} GFLOP/s; {flops / 1e6:.2f} MFLOP per training token")
    print("val loss over time (step, s, nats/char):", row["curve"])
    for name, ok in ((f"val loss <= {TARGET_VAL_LOSS} within {args.budget_s:.0f} s",
                      nats_per_char <= TARGET_VAL_LOSS),
                     (f"train tok/s >= {TARGET_TOKENS_PER_S:,}", tps >= TARGET_TOKENS_PER_S)):
        print(f"target: {name}: {'PASS' if ok else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(row, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
