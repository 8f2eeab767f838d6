"""Does streaming pay on a trained model? Delta-aware training, local routing and
learned expert prediction, before and after (issue 24; docs/benchmarks.md).

    python tools/bench_locality.py train OUT [--variants before,after] [--experts 8|64]
                                              [--dense RUN] [--data PATH]
    python tools/bench_locality.py measure OUT [--variants ...] [--tokens 96]
    python tools/bench_locality.py decode --model-dir M [--model-dir M2] [--io direct]

`train` trains one dense run (OUT/dense, or reuses --dense), then for every variant
the routed curriculum upcycle → sparse → ternary → align into OUT/VARIANT/ with the
variant's config overrides (VARIANTS), each stage through `perspective-train`, and
records the wall time of each stage. `measure` exports each variant
(`perspective-export`) and prints one table per model: validation loss; neighbour
and non-neighbour trit difference and deltas kept; adjacent-token switch shares;
prefetch accuracy; disk and host→device bytes per decode token with deltas on and
off at a host budget holding ~10 % of the experts (the 1.05T ratio); stalls per
token. The configuration is the tiny curriculum (curricula/tiny.yaml), with 8
experts on 2×2×2 or 64 on 4×4×4 (`--experts`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench_locality_measure import BIN, decode, measure

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What every variant sets explicitly, so a table stays reproducible when defaults move.
BEFORE = ["moe.delta_form=float", "moe.delta_weight=0.001", "moe.smoothness_weight=0.005",
          "moe.locality_weight=0", "moe.align_consensus=0", "moe.route_smoothing=0"]
VARIANTS = {
    "before": BEFORE,                                          # the defaults until issue 24
    "consensus": [*BEFORE, "moe.align_consensus=0.2"],         # align's snap alone
    "ternary-delta": [*BEFORE, "moe.delta_form=ternary", "moe.delta_weight=10"],
    # delta-aware training and trained heads, routes from each token's own state
    "delta": ["moe.route_smoothing=0"],
    "delta-narrow-router": ["moe.route_smoothing=0", "moe.route_init_scale=0.25",
                            "moe.balance_weight=1.0"],
    "after": [],                                               # today's defaults
    "after-0.99": ["moe.route_smoothing=0.99"],
    "after-delta30": ["moe.delta_weight=30"],                 # experts held closer
}
EXPERTS = {8: ["moe.num_experts=8", "moe.lattice=[2,2,2]"],
           64: ["moe.num_experts=64", "moe.lattice=[4,4,4]"]}
ROUTED = ("upcycle", "sparse", "ternary", "align")


def _train_stage(stage, run_dir, init_from, args, overrides):
    cmd = [os.path.join(BIN, "perspective-train"), "--stage", stage, "--run-dir", run_dir,
           "--config", args.config, "--no-progress"]
    if init_from:
        cmd += ["--init-from", init_from]
    for path in args.data or ():
        cmd += ["--data", path]
    t0 = time.perf_counter()
    subprocess.run(cmd + overrides, check=True)
    return time.perf_counter() - t0


def train(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    dense = args.dense or os.path.join(args.out, "dense")
    times_path = os.path.join(args.out, "times.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    if not args.dense:
        times["dense"] = _train_stage("dense", dense, None, args, [])
    for name in args.variants:
        overrides = [*VARIANTS[name], *EXPERTS[args.experts]]
        previous, spent = dense, {}
        for stage in ROUTED:
            run_dir = os.path.join(args.out, name, stage)
            spent[stage] = _train_stage(stage, run_dir, previous, args, overrides)
            previous = run_dir
        times[name] = spent
        with open(times_path, "w") as fh:
            json.dump(times, fh, indent=1)
        print(f"{name}: trained in {sum(spent.values()):.0f} s "
              f"({', '.join(f'{k} {v:.0f}' for k, v in spent.items())})", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("train", "measure"):
        s = sub.add_parser(name)
        s.add_argument("out")
        s.add_argument("--variants", default="before,after")
        s.add_argument("--experts", type=int, choices=sorted(EXPERTS), default=8)
        s.add_argument("--config", default=os.path.join(REPO, "curricula", "tiny.yaml"))
        s.add_argument("--data", action="append")
        s.add_argument("--dense", help="reuse this dense run instead of training OUT/dense")
        s.add_argument("--tokens", type=int, default=96)
    s = sub.add_parser("decode", help="decode rates of exported models (e.g. on a GPU)")
    s.add_argument("--model-dir", action="append", required=True)
    s.add_argument("--tokens", type=int, default=96)
    s.add_argument("--io", default="mmap")
    args = p.parse_args(argv)
    if args.cmd == "decode":
        decode(args)
        return 0
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown and args.cmd == "train":
        p.error(f"unknown variant(s) {unknown}; use {sorted(VARIANTS)}")
    missing = [v for v in args.variants
               if not os.path.isdir(os.path.join(args.out, v, "align"))]
    if missing and args.cmd == "measure":
        p.error(f"no trained align run for {missing} under {args.out}: run `train` first")
    if args.cmd == "train":
        train(args)
    else:
        measure(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
