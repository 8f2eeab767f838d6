"""Step time of one training run as 1 process × 8 CPU devices and as 2 processes × 4
(JAX's distributed runtime on 127.0.0.1, gloo collectives) — for correctness on one
machine, not speed: the two processes share its cores.

    python tools/bench_multiprocess.py [--steps 40] [--data PATH] [--out DIR] [model overrides]

Prints a Markdown table: median step time (from metrics.jsonl's tokens/s after the
first logged steps), wall time of the whole command (start-up and compile included),
the final train loss of each and the largest per-step loss difference.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

LAUNCH = "from perspective_jax.cli.launch import train; train()"
MODEL = ["model.vocab_size=259", "model.d_model=128", "model.n_layers=4", "model.d_ff=256",
         "model.pdr_rank=16", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=32",
         "model.window=64", "data.tokenizer=byte", "data.seq_len=128", "train.batch_size=16",
         "train.warmup_steps=5", "train.eval_every=100000", "train.eval_batches=1",
         "train.log_every=1", "checkpoint.every=100000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(run_dir: str) -> list[dict]:
    by_step = {}
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec["kind"] == "train":
                by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)]


def launch(run_dir: str, n_proc: int, common: list[str]) -> float:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // n_proc}"}
    port = free_port()
    t0 = time.perf_counter()
    procs = []
    for i in range(n_proc):
        extra = ([] if n_proc == 1 else ["--coordinator", f"127.0.0.1:{port}",
                                         "--num-processes", str(n_proc), "--process-id",
                                         str(i)])
        procs.append(subprocess.Popen([sys.executable, "-c", LAUNCH, "--run-dir", run_dir,
                                       *common, *extra], env=env, stdout=subprocess.DEVNULL))
    codes = [p.wait(timeout=3600) for p in procs]
    if any(codes):
        sys.exit(f"error: the {n_proc}-process run failed (exit codes {codes})")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--data", default=None, help="corpus (default: the standard library)")
    p.add_argument("--out", default=None, help="where the two runs go (default: a temp dir)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="bench-mp-")
    data = ["--data", args.data] if args.data else []
    common = ["--stage", "dense", "--no-progress", *data, *MODEL,
              f"train.steps={args.steps}", *args.overrides]
    rows, losses = [], {}
    skip = max(3, args.steps // 5)                 # compile and warm-up steps
    for n_proc in (1, 2):
        run_dir = os.path.join(out, f"p{n_proc}")
        wall = launch(run_dir, n_proc, common)
        recs = records(run_dir)
        tokens = 16 * 128
        for ov in args.overrides:               # batch / sequence overrides change tokens
            if ov.startswith("train.batch_size="):
                tokens = tokens // 16 * int(ov.split("=")[1])
            if ov.startswith("data.seq_len="):
                tokens = tokens // 128 * int(ov.split("=")[1])
        ms = statistics.median(1e3 * tokens / r["tokens_per_s"] for r in recs[skip:])
        losses[n_proc] = [r["loss"] for r in recs]
        rows.append((f"{n_proc} × {8 // n_proc} CPU devices", ms, wall, recs[-1]["loss"]))
    diff = max(abs(a - b) for a, b in zip(losses[1], losses[2]))
    print(f"| processes × devices | step (ms, median) | command wall (s) | final loss |")
    print("|---|---|---|---|")
    for name, ms, wall, loss in rows:
        print(f"| {name} | {ms:.1f} | {wall:.1f} | {loss:.5f} |")
    print(f"\nlargest per-step loss difference over {args.steps} steps: {diff:.2e}")


if __name__ == "__main__":
    main()
