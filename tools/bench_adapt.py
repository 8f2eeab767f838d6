"""Forward-mode adaptation vs backprop LoRA on a held-out domain (issue 26).

    python tools/bench_adapt.py --run-dir runs/quickstart/align --model-dir models/tiny \
        --data ../shared/data/tinyshakespeare.txt [--examples 100] [--epochs 10]

The Quickstart model (trained on Python source) meets TinyShakespeare: `--examples`
windows of `--seq-len` + 1 tokens to adapt on, `--heldout` other windows to measure
(seeded draws, disjoint). Every method sees the same examples in the same order,
`--epochs` passes in batches of `--batch` (100 examples, 10 epochs, batch 10: 100
updates), rank-4 LoRA on W_p, and keeps its best learning rate of `--lrs`:

  backprop   jax.grad of the loss w.r.t. the adapters, Adam
  forward    K jvp directions (`--directions`; forward@K: K), ĝ = mean (∇L·v) v, Adam
             (no backward pass)
  guided     forward, half the directions on the run's recent estimates
  forward-b  forward on the B matrices alone (A frozen at its random start)
  nes        NES on the routed layers' expert coordinates alone (no adapters)

In memory: the run's weights with the exported (ternary) expert values. Prints the
held-out loss before/after, the reduction and its share of backprop's, seconds per
update, and the update's memory: XLA's temporaries of the compiled update (the
forward-gradient jvp pass vs the backprop gradient), and on the streamed model
(`--model-dir`) the peak of live device arrays during a forward-gradient update
beyond the engine's resident weights, against the engine's decode budget.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.adapt.forward_grad import directions
from perspective_jax.adapt.loop import AdaptConfig, Adaptation
from perspective_jax.adapt.nes import NESConfig
from perspective_jax.adapt.target import InMemoryTarget, StreamedTarget
from perspective_jax.export.exporter import with_ternary_experts
from perspective_jax.infer.engine import StreamingEngine, load_model_tokenizer
from perspective_jax.infer.options import EngineOptions
from perspective_jax.model.transformer import abstract_params
from perspective_jax.rundir.checkpoint import restore_params
from perspective_jax.rundir.layout import load_run_config

MB = 1 << 20


def windows_of(model_dir, data, seq_len, n_train, n_held, seed):
    tok = load_model_tokenizer(model_dir)
    ids = np.asarray(tok.encode(open(data, encoding="utf-8").read()), np.int32)
    n = len(ids) // (seq_len + 1)
    w = ids[: n * (seq_len + 1)].reshape(n, seq_len + 1)
    perm = np.random.default_rng(seed).permutation(n)
    return w[perm[:n_train]], w[perm[n_train: n_train + n_held]]


def train(method, target, lr, args, train_w, held_w):
    """Held-out loss after the epochs and seconds per update, for one method and lr."""
    rng = np.random.default_rng(args.seed)
    method, _, k = method.partition("@")          # forward@32: 32 directions
    k = int(k) if k else args.directions
    if method == "nes":
        cfg = AdaptConfig(nes=NESConfig(population=args.population, sigma=0.01, lr=lr),
                          seed=args.seed)
    else:
        cfg = AdaptConfig(lr=lr, directions=k, seed=args.seed,
                          estimator="guided" if method == "guided" else "plain",
                          adapt_a=method != "forward-b")
    run = Adaptation(target, cfg)
    grad = jax.jit(jax.grad(lambda a, b: target.loss_fn(target.params, b, a)))
    seconds, updates, curve = 0.0, 0, []
    for epoch in range(args.epochs):
        order = rng.permutation(len(train_w))
        for s in range(0, len(order), args.batch):
            batch = jnp.asarray(train_w[order[s: s + args.batch]])
            t0 = time.perf_counter()
            if method == "backprop":
                g = grad(run.lora, batch)
                run.lora, run.opt_state = run._apply(g, run.opt_state, run.lora)
                jax.block_until_ready(run.lora)
            elif method == "nes":
                run.nes(batch)
            else:
                run.step(batch)
            if updates > 0:                          # the first update compiles
                seconds += time.perf_counter() - t0
            updates += 1
        curve.append(target.loss(held_w, None if method == "nes" else run.lora, run.coords))
    return curve, seconds / max(updates - 1, 1)


def update_memory(target, args, batch):
    """XLA temporaries (bytes) of one forward-gradient pass (the target's own, with
    all K tangents at once and one at a time) vs one backprop gradient."""
    run = Adaptation(target, AdaptConfig(directions=args.directions))
    v = directions(jax.random.key(0), args.directions, run.dim)
    tangents = jax.vmap(run._unravel)(v)
    params = target.params

    def temp(jitted, *a):
        return int(jitted.lower(*a).compile().memory_analysis().temp_size_in_bytes)
    one = InMemoryTarget(target.cfg, params, tangents_per_pass=1)
    bp = jax.jit(jax.value_and_grad(lambda a, b: target.loss_fn(params, b, a)))
    return (temp(target._derivatives, params, batch, run.lora, tangents),
            temp(one._derivatives, params, batch, run.lora, tangents),
            temp(bp, run.lora, batch))


def streamed(args, train_w):
    """Seconds per forward-gradient update on the streamed model, peak live device bytes
    beyond the engine's resident arrays, and the engine's decode budget."""
    engine = StreamingEngine(args.model_dir, EngineOptions(host_budget_mb=args.host_budget_mb))
    resident = sum(a.nbytes for a in jax.live_arrays())
    peak = [0]

    def probe():
        peak[0] = max(peak[0], sum(a.nbytes for a in jax.live_arrays()) - resident)
    target = StreamedTarget(engine, rows_per_pass=args.rows_per_pass)
    target.on_layer = probe
    run = Adaptation(target, AdaptConfig(directions=args.directions, lr=args.stream_lr))
    times = []
    for s in range(args.stream_updates):
        batch = np.take(train_w, np.arange(s * args.batch, (s + 1) * args.batch), axis=0,
                        mode="wrap")
        t0 = time.perf_counter()
        run.step(batch)
        times.append(time.perf_counter() - t0)
    state = engine.new_state()
    _, state = engine.forward(train_w[0, :32], state)
    t0 = time.perf_counter()
    for tok in train_w[0, 32:96]:
        _, state = engine.forward(np.array([tok]), state)
    decode_s = (time.perf_counter() - t0) / 64
    budget = engine.budget
    engine.close()
    return {"update_s": float(np.median(times[1:])) if len(times) > 1 else times[0],
            "peak_extra_mb": peak[0] / MB, "decode_budget_mb": budget.needed / MB,
            "decode_workspace_mb": budget.workspace_bytes / MB, "decode_s": decode_s}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--examples", type=int, default=100)
    p.add_argument("--heldout", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--directions", type=int, default=8)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--methods", default="backprop,forward,forward@32,guided,nes",
                   help="forward@K: K directions instead of --directions")
    p.add_argument("--lrs", default="backprop=3e-3,1e-2,3e-2;forward=1e-2,3e-2;"
                   "forward@32=3e-2;forward-b=3e-2;guided=1e-2,3e-2;nes=2e-4,2e-3")
    p.add_argument("--host-budget-mb", type=float, default=0.5)
    p.add_argument("--rows-per-pass", type=int, default=1)
    p.add_argument("--stream-updates", type=int, default=4)
    p.add_argument("--stream-lr", type=float, default=3e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args(argv)
    cfg = load_run_config(args.run_dir)
    params = restore_params(args.run_dir, abstract_params(cfg.model, cfg.moe))
    target = InMemoryTarget(cfg, with_ternary_experts(jax.tree.map(np.asarray, params), cfg))
    train_w, held_w = windows_of(args.model_dir, args.data, args.seq_len, args.examples,
                                 args.heldout, args.seed)
    base = target.loss(held_w, None)
    lrs = {k: [float(x) for x in v.split(",")] for k, v in
           (part.split("=") for part in args.lrs.split(";"))}
    rows, out = [], {"base_heldout": base, "methods": {}}
    print(f"held-out loss before: {base:.4f} ({args.heldout} windows of {args.seq_len})",
          flush=True)
    for method in args.methods.split(","):
        for lr in lrs[method]:
            curve, sec = train(method, target, lr, args, train_w, held_w)
            out["methods"].setdefault(method, []).append(
                {"lr": lr, "curve": curve, "s_per_update": sec})
            print(f"  {method:9s} lr {lr:g}: held-out by epoch "
                  f"{' '.join(f'{c:.3f}' for c in curve)}  ({sec * 1e3:.0f} ms/update)",
                  flush=True)
        best = min(out["methods"][method], key=lambda r: r["curve"][-1])
        rows.append((method, best["lr"], best["curve"][-1], base - best["curve"][-1],
                     best["s_per_update"]))
    bp_gain = next((r[3] for r in rows if r[0] == "backprop"), None)
    print(f"\n| method | best lr | held-out after | reduction | share of backprop's | "
          f"ms / update |\n|---|---|---|---|---|---|")
    for m, lr, after, gain, sec in rows:
        share = f"{gain / bp_gain:.0%}" if bp_gain else "–"
        print(f"| {m} | {lr:g} | {after:.4f} | {gain:.4f} | {share} | {sec * 1e3:.0f} |")
    fg_tmp, fg1_tmp, bp_tmp = update_memory(target, args, jnp.asarray(train_w[: args.batch]))
    out["memory"] = {"forward_temp_mb": fg_tmp / MB, "forward_one_tangent_temp_mb":
                     fg1_tmp / MB, "backprop_temp_mb": bp_tmp / MB}
    print(f"\nupdate temporaries (XLA memory analysis, batch {args.batch}, in memory): "
          f"forward, {args.directions} tangents per pass {fg_tmp / MB:.2f} MB "
          f"({fg_tmp / bp_tmp:.2f}×), 1 tangent per pass {fg1_tmp / MB:.2f} MB "
          f"({fg1_tmp / bp_tmp:.2f}×); backprop {bp_tmp / MB:.2f} MB")
    s = streamed(args, train_w)
    out["streamed"] = s
    print(f"streamed forward-gradient update (batch {args.batch}, {args.rows_per_pass} "
          f"row(s) per pass, host budget {args.host_budget_mb} MB): "
          f"{s['update_s']:.2f} s/update; peak live device arrays beyond the engine's "
          f"weights {s['peak_extra_mb']:.2f} MB vs decode budget {s['decode_budget_mb']:.2f} MB "
          f"(decode workspace {s['decode_workspace_mb']:.2f} MB); decode "
          f"{s['decode_s'] * 1e3:.1f} ms/token")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
