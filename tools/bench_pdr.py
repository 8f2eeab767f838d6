"""Benchmark the Perspective Decay Recurrence scans (issue 2).

Measures, for each `pdr_scan` implementation (chunked, matmul, scan, associative) and
each sequence length T:

  * forward time          jit-compiled, warm, median of --repeats runs
  * forward+backward time jax.grad of sum(y * fixed random cotangent)
                          w.r.t. (log_decay, k, q, v)
  * memory (MB)           XLA compiled memory analysis of the same two
                          programs: argument + output + temp - alias bytes

An implementation whose memory analysis exceeds --max-run-gb is compiled and
analysed but not run. Targets checked (PASS/FAIL per T): chunked fwd+bwd is
at least 2x faster than scan, and uses at least 10x less memory than
associative. `--chunks 8,16,32,64` adds a chunk-size sweep for `chunked`
(`--sweep-impls chunked,matmul` for both chunked forms).

Run from the repo root:

    .venv/bin/python tools/bench_pdr.py                  # full (T=1024,4096)
    .venv/bin/python tools/bench_pdr.py --quick          # T=1024, fewer repeats
    .venv/bin/python tools/bench_pdr.py --chunks 8,16,32,64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os

from perspective_jax.cli.allocator import ensure_fast_allocator  # noqa: E402

if __name__ == "__main__":
    ensure_fast_allocator()         # before JAX starts (cli/allocator.py)

import jax
import jax.numpy as jnp

from benchlib import median_ms  # noqa: E402
from kernels_pallas.pdr_scan import PDR_IMPLS as IMPLS, pdr_scan  # noqa: E402

MB = 1024 ** 2
GB = 1024 ** 3


def parse_args(argv=None):
    """Command-line options; shapes and targets default to the issue-2 spec."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqs", default="1024,4096", help="comma-separated T values")
    p.add_argument("--d", type=int, default=256, help="state rows (value dim)")
    p.add_argument("--r", type=int, default=64, help="state cols (key dim)")
    p.add_argument("--chunk", type=int, default=16, help="chunk size for the main table")
    p.add_argument("--impls", default="chunked,scan,associative",
                   help=f"comma-separated subset of {IMPLS} (pallas is interpreted on CPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    p.add_argument("--quick", action="store_true", help="first T only, 2 repeats")
    p.add_argument("--chunks", default="", help="chunk sizes to sweep, e.g. 8,16,32,64")
    p.add_argument("--sweep-seq", type=int, default=1024, help="T for the chunk sweep")
    p.add_argument("--sweep-impls", default="chunked",
                   help="implementations the chunk sweep runs (chunked, matmul)")
    p.add_argument("--max-run-gb", type=float, default=12.0,
                   help="skip running programs whose memory analysis exceeds this")
    p.add_argument("--decay-range", type=float, default=4.0,
                   help="log_decay = log_sigmoid(uniform(-x, x))")
    p.add_argument("--target-speedup", type=float, default=2.0)
    p.add_argument("--target-mem-ratio", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write results as JSON to PATH ('-' for stdout)")
    args = p.parse_args(argv)
    if args.quick:
        args.seqs = args.seqs.split(",")[0]
        args.repeats = 2
    return args


def make_inputs(args, t):
    """Realistic float32 inputs plus a fixed random cotangent for the loss."""
    keys = jax.random.split(jax.random.PRNGKey(args.seed + t), 5)
    b, d, r = args.batch, args.d, args.r
    lim = args.decay_range
    log_decay = jax.nn.log_sigmoid(jax.random.uniform(keys[0], (b, t, d), minval=-lim, maxval=lim))
    k = jax.random.normal(keys[1], (b, t, r)) / jnp.sqrt(r)
    q = jax.random.normal(keys[2], (b, t, r)) / jnp.sqrt(r)
    v = jax.random.normal(keys[3], (b, t, d))
    state = jnp.zeros((b, d, r), jnp.float32)
    cot = jax.random.normal(keys[4], (b, t, d))
    return (log_decay, k, q, v, state), cot


def build_fns(impl, chunk):
    """Return (forward, forward+backward) functions for one implementation."""
    def fwd(log_decay, k, q, v, state, cot):
        del cot
        return pdr_scan(log_decay, k, q, v, state, impl=impl, chunk=chunk)

    def loss(log_decay, k, q, v, state, cot):
        y, _ = pdr_scan(log_decay, k, q, v, state, impl=impl, chunk=chunk)
        return jnp.sum(y * cot)

    return fwd, jax.grad(loss, argnums=(0, 1, 2, 3))


def compiled_mb(fn, args):
    """Compile `fn` for `args`; return (compiled, MB from XLA memory analysis)."""
    compiled = jax.jit(fn).lower(*args).compile()
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes
             + m.temp_size_in_bytes - m.alias_size_in_bytes)
    return compiled, total / MB


def measure(impl, t, chunk, args, inputs):
    """Memory for fwd and fwd+bwd; time each unless it needs > --max-run-gb."""
    xs = (*inputs[0], inputs[1])
    row = dict(impl=impl, T=t, chunk=chunk if impl in ("chunked", "matmul", "pallas") else None)
    for name, fn in zip(("fwd", "bwd"), build_fns(impl, chunk)):
        compiled, mb = compiled_mb(fn, xs)
        row[f"{name}_mb"], row[f"{name}_ms"], row[f"{name}_skipped"] = mb, None, None
        if mb * MB / GB > args.max_run_gb:
            row[f"{name}_skipped"] = f"skipped (needs {mb * MB / GB:.1f} GB)"
        else:
            row[f"{name}_ms"] = median_ms(compiled, xs, args.repeats)
        del compiled
    print(f"  {impl:<11} T={t:<5} chunk={fmt(row['chunk'], 'd'):<3} "
          f"fwd {cell(row, 'fwd')}  fwd+bwd {cell(row, 'bwd')} (ms)", flush=True)
    return row


def cell(row, name):
    """Time cell for fwd/bwd: milliseconds, or the skip message."""
    return row[f"{name}_skipped"] or fmt(row[f"{name}_ms"])


def fmt(x, spec=".1f"):
    """Format a number, or '-' for a missing value."""
    return "-" if x is None else format(x, spec)


def print_table(rows, title):
    """Markdown table of times and memory."""
    print(f"\n{title}\n")
    print("| impl | T | chunk | fwd ms | fwd+bwd ms | fwd MB | fwd+bwd MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['impl']} | {r['T']} | {fmt(r['chunk'], 'd')} | {cell(r, 'fwd')} | "
              f"{cell(r, 'bwd')} | {fmt(r['fwd_mb'], '.0f')} | {fmt(r['bwd_mb'], '.0f')} |")


def check_targets(rows, args):
    """Per T: chunked-vs-scan fwd+bwd speedup and associative/chunked memory."""
    by = {(r["impl"], r["T"]): r for r in rows}
    results = []
    print("\nTargets\n")
    for t in sorted({r["T"] for r in rows}):
        ch, sc, asc = by.get(("chunked", t)), by.get(("scan", t)), by.get(("associative", t))
        if ch and sc and ch["bwd_ms"] and sc["bwd_ms"]:
            s = sc["bwd_ms"] / ch["bwd_ms"]
            ok = s >= args.target_speedup
            results.append(dict(T=t, target="speedup_vs_scan", value=s, passed=ok))
            print(f"- T={t}: chunked fwd+bwd speedup vs scan = {s:.2f}x "
                  f"(target >= {args.target_speedup:g}x): {'PASS' if ok else 'FAIL'}")
        if ch and asc:
            m = asc["bwd_mb"] / ch["bwd_mb"]
            ok = m >= args.target_mem_ratio
            results.append(dict(T=t, target="assoc_mem_ratio", value=m, passed=ok))
            print(f"- T={t}: associative / chunked fwd+bwd memory = {m:.1f}x "
                  f"(target >= {args.target_mem_ratio:g}x): {'PASS' if ok else 'FAIL'}")
    return results


def main(argv=None):
    """Run the main table, the optional chunk sweep, and the target checks."""
    args = parse_args(argv)
    cpu = os.cpu_count()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
          f"devices {jax.devices()}, {cpu} CPU cores")
    print(f"B={args.batch} d={args.d} r={args.r} chunk={args.chunk} repeats={args.repeats}")
    rows = []
    for t in (int(s) for s in args.seqs.split(",")):
        inputs = make_inputs(args, t)
        for impl in args.impls.split(","):
            rows.append(measure(impl, t, args.chunk, args, inputs))
    sweep = []
    if args.chunks:
        inputs = make_inputs(args, args.sweep_seq)
        print(f"\nchunk sweep ({args.sweep_impls}, T={args.sweep_seq})")
        for impl in args.sweep_impls.split(","):
            for c in (int(s) for s in args.chunks.split(",")):
                sweep.append(measure(impl, args.sweep_seq, c, args, inputs))
    print_table(rows, "Main table")
    if sweep:
        print_table(sweep, f"Chunk sweep (T={args.sweep_seq})")
    targets = check_targets(rows, args)
    if args.json:
        out = dict(jax=jax.__version__, cpu_count=cpu, args=vars(args),
                   rows=rows, sweep=sweep, targets=targets)
        text = json.dumps(out, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()
