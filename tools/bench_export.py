"""Streaming export (issue 23): peak host memory and speed of `perspective-export
--max-host-mb` on synthetic checkpoints larger than the cap.

    python tools/bench_export.py --work /tmp/bench-export --cap-mb 256 --periods 12 24

For each period count, a routed ternary run (byte tokenizer, a token store of a few
standard-library modules for calibration, d_model 256, d_ff 512, 8 experts, layer
pattern PDR PDR PDR GQA; ~42.6 MB of float32 parameters per period) is written
with the trainer's own checkpointer, its parameters sharded over an expert-parallel
mesh of 8 CPU devices (chunks of the shard shape, as an expert-parallel trainer
writes them), its optimizer state alongside. Each is then exported three ways,
each `perspective-export` a process of its own started through the console
script's launcher (so with its allocator choice):

* baseline: `--max-host-mb 1`, refused right after the memory check — the process
  with Python, JAX and the checkpoint's metadata open, before any weights;
* streamed: `--max-host-mb CAP`;
* whole: no cap (the whole model restored; `--skip-whole` leaves it out).

Peak RSS is the process's ru_maxrss (os.wait4); the bench process itself stays
small (the runs are built by a child of their own, and Linux counts the parent's
RSS at fork into a child's ru_maxrss). GB/s = the checkpoint's float32
parameter bytes / wall time. The streamed and whole outputs are compared file by
file (the manifest without its creation time and checksum): they must be the same.
Prints a Markdown table; `--json FILE` writes every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import pathlib
import subprocess
import sys
import time

DEVICES_FLAG = "--xla_force_host_platform_device_count=8"   # the build's expert mesh

MODEL = {"model.vocab_size": 259, "model.d_model": 256, "model.d_ff": 512,
         "model.pdr_rank": 32, "model.n_heads": 4, "model.n_kv_heads": 2,
         "model.head_dim": 64, "model.window": 64, "model.routed": "true",
         "moe.num_experts": 8, "moe.lattice": "[2,2,2]", "data.tokenizer": "byte",
         "train.steps": 2, "train.warmup_steps": 0, "checkpoint.async_save": "false"}
MB = 2 ** 20


def build_run(path: str, periods: int, layout: str, seed: int = 0) -> None:
    """A finished align-stage run of `periods` periods (in a child process of its own:
    8 CPU devices; its float32 parameter bytes go to path/bench.json). `layout`
    "trainer": written by the trainer's Checkpointer (chunks = shards, spanning every
    period); "period": the same state written with orbax's SaveArgs asking for one
    period per chunk of every stacked parameter (shard_axes=(0,))."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + DEVICES_FLAG).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import logging
    logging.getLogger("absl").setLevel(logging.ERROR)   # orbax: small chunk targets
    import jax
    from perspective_jax.config import MeshConfig, load_config
    from perspective_jax.data.byte_tokenizer import ByteTokenizer
    from perspective_jax.data.corpus import Document, split_documents
    from perspective_jax.data.token_store import build_token_store
    from perspective_jax.model.transformer import abstract_params, init_params, logical_axes
    from perspective_jax.rundir.checkpoint import Checkpointer
    from perspective_jax.rundir.layout import save_run_config
    from perspective_jax.train.resume import check_data_record
    from perspective_jax.train.sharding import make_mesh, param_shardings
    from perspective_jax.train.stages import stage_config
    from perspective_jax.train.step import init_state, make_optimizer
    overrides = {**MODEL, "model.n_layers": 4 * periods}
    cfg = stage_config(load_config(None, [f"{k}={v}" for k, v in overrides.items()]), "align")
    run = pathlib.Path(path)
    run.mkdir(parents=True)
    (run / "tokenizer.byte").write_text("utf-8 bytes\n")
    docs = [Document(inspect.getsourcefile(mod), pathlib.Path(inspect.getsourcefile(mod))
                     .read_text()) for mod in (argparse, dataclasses, inspect, json)]
    train_docs, val_docs = split_documents(docs, cfg.data.val_fraction)
    train_split, _ = build_token_store(str(run), train_docs, val_docs, ByteTokenizer())
    check_data_record(str(run), train_split.store, "--data stdlib modules", resuming=False)
    save_run_config(cfg, str(run))
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, expert=8, tensor=1))
    shardings = param_shardings(logical_axes(cfg.model, cfg.moe),
                                abstract_params(cfg.model, cfg.moe), mesh)
    params = jax.device_put(init_params(cfg.model, jax.random.key(seed), moe=cfg.moe),
                            shardings)
    state = init_state(params, make_optimizer(cfg.train))
    if layout == "trainer":
        ckpt = Checkpointer(str(run), cfg.checkpoint, log=lambda *_: None)
        ckpt.save(cfg.train.steps, state, None, {"stage": "align"}, force=True)
        ckpt.close()
    else:
        save_period_chunked(str(run), cfg.train.steps, state)
    size = sum(int(a.size) for a in jax.tree.leaves(params)) * 4
    (run / "bench.json").write_text(json.dumps({"params_bytes": size}))


def save_period_chunked(run: str, step: int, state) -> None:
    """`state` saved as the Checkpointer saves it, but every parameter stacked over
    periods stored in chunks of one period (then listed with its checksums)."""
    import jax
    import orbax.checkpoint as ocp
    from perspective_jax.rundir import checkpoint_steps
    from perspective_jax.rundir.checkpoint import CHECKPOINT_DIR

    def args(path, a):
        stacked = any(getattr(k, "key", None) == "periods" for k in path) and a.ndim >= 2
        if not stacked:
            return ocp.SaveArgs()
        shard = a.addressable_shards[0].data
        return ocp.SaveArgs(chunk_byte_size=shard.nbytes // shard.shape[0], shard_axes=(0,))
    directory = os.path.abspath(os.path.join(run, CHECKPOINT_DIR))
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=False))
    save_args = jax.tree_util.tree_map_with_path(args, state)
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state, save_args=save_args),
        meta=ocp.args.JsonSave({"stage": "align"})))
    manager.wait_until_finished()
    checkpoint_steps.record(os.path.join(directory, str(step)), step)
    manager.close()


def export(run: str, out: str, flags: list) -> dict:
    """Run perspective-export (through its launcher) → {peak_mb, wall_s, rc, tail}."""
    cmd = [sys.executable, "-c", "from perspective_jax.cli.launch import export; export()",
           "--run-dir", run, "--out", out, "--force", *flags]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    text = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"peak_mb": usage.ru_maxrss / 1024, "wall_s": time.perf_counter() - t0,
            "rc": proc.returncode, "tail": text.strip().splitlines()[-3:]}


def same_files(a: str, b: str) -> bool:
    """Every file equal; the manifest equal but for its time of creation and checksum."""
    def files(d):
        return {os.path.relpath(os.path.join(r, n), d): os.path.join(r, n)
                for r, _, names in os.walk(d) for n in names}
    fa, fb = files(a), files(b)
    if set(fa) != set(fb):
        return False
    for rel in fa:
        with open(fa[rel], "rb") as x, open(fb[rel], "rb") as y:
            da, db = x.read(), y.read()
        if rel == "manifest.json":
            da, db = (json.dumps({k: v for k, v in json.loads(t).items()
                                  if k not in ("created", "manifest_sha256")}) for t in (da, db))
        if da != db:
            return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="directory for the runs and exports")
    p.add_argument("--cap-mb", type=int, default=256)
    p.add_argument("--periods", type=int, nargs="+", default=[12, 24])
    p.add_argument("--flags", default="", help="more perspective-export flags, e.g. "
                   "'--shared-bits 2 --calibration-tokens 1024'")
    p.add_argument("--layout", choices=("trainer", "period"), default="trainer",
                   help="checkpoint chunks: the trainer's (shards spanning every period) "
                        "or one period per chunk")
    p.add_argument("--skip-whole", action="store_true")
    p.add_argument("--json")
    a = p.parse_args(argv)
    from perspective_jax.cli.allocator import (allocator_env, find_jemalloc,
                                               glibc_has_hugetlb)
    os.makedirs(a.work, exist_ok=True)
    flags, rows = a.flags.split(), []
    for periods in a.periods:
        run = os.path.join(a.work, f"run-{a.layout}-p{periods}")
        if not os.path.isdir(run):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--build", run, str(periods), a.layout],
                           check=True)
            print(f"built {run} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        with open(os.path.join(run, "bench.json")) as fh:
            total = json.load(fh)["params_bytes"]
        row = {"periods": periods, "params_mb": total / MB}
        row["baseline"] = export(run, os.path.join(a.work, "refused"),
                                 flags + ["--max-host-mb", "1"])
        row["need_mb"] = int(row["baseline"]["tail"][-1].split("--max-host-mb ")[-1].split()[0])
        cap_out = os.path.join(a.work, f"out-{a.layout}-p{periods}-cap")
        whole_out = os.path.join(a.work, f"out-{a.layout}-p{periods}-whole")
        row["streamed"] = export(run, cap_out, flags + ["--max-host-mb", str(a.cap_mb)])
        if not a.skip_whole:
            row["whole"] = export(run, whole_out, flags)
            row["identical"] = same_files(cap_out, whole_out)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    _, allocator = allocator_env(os.environ, jemalloc=find_jemalloc(),
                                 hugetlb=glibc_has_hugetlb(), accelerator=False)
    print(f"\ncheckpoint layout: {a.layout}; perspective-export {' '.join(flags)} "
          f"--max-host-mb {a.cap_mb}; allocator: "
          f"{allocator}; {os.cpu_count()} CPUs\n")
    print("| float32 params | periods | export | peak RSS | baseline RSS | peak − baseline | "
          "largest piece (estimate) | wall | GB/s | same files |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for kind in ("streamed", "whole"):
            if kind not in r:
                continue
            x = r[kind]
            if x["rc"]:
                print(f"| {r['params_mb']:.0f} MB | {r['periods']} | {kind} | failed: "
                      f"{x['tail'][-1]} |")
                continue
            label = f"--max-host-mb {a.cap_mb}" if kind == "streamed" else "whole model"
            print(f"| {r['params_mb']:.0f} MB | {r['periods']} | {label} | "
                  f"{x['peak_mb']:.0f} MB | {r['baseline']['peak_mb']:.0f} MB | "
                  f"{x['peak_mb'] - r['baseline']['peak_mb']:.0f} MB | "
                  f"{r['need_mb'] if kind == 'streamed' else '—'} MB | {x['wall_s']:.1f} s | "
                  f"{r['params_mb'] * MB / x['wall_s'] / 1e9:.3f} | "
                  f"{'yes' if r.get('identical') else ('no' if 'identical' in r else '—')} |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"cap_mb": a.cap_mb, "flags": flags, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--build"]:
        build_run(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit(main())
