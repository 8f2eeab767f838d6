"""Compile the trainer's sharded train step of a config on a fake CPU mesh, abstractly,
and print XLA's per-device memory and FLOPs beside the derived training plan
(`perspective_jax.train.plan`, what `perspective-budget --train` prints).

    python tools/compile_train_plan.py --devices 1024 [--config C] [--stage sparse]
        [--optimizer-state trainer,sharded] [--constrain-activations] [--top 12]
        [--json] [key=value ...]

The step is built as `train.trainer.setup` builds it — `make_train_step(train_apply,
tx, lr_schedule, ce_weight)` jitted with in_shardings=(state shardings, batch
sharding), donate_argnums=(0,) — and lowered on `jax.ShapeDtypeStruct`s that carry
their `NamedSharding`s: nothing is allocated. XLA is asked for --devices host devices
(XLA_FLAGS, set here before JAX is imported), so this runs as its own process.

--optimizer-state picks the state shardings (comma-separated: one compile each):
`trainer` takes them from the trainer's own initialisation (`plan.initial_state` on the
sharded parameters, as `trainer._initial_state` runs it); `sharded` and `replicated`
are `plan.state_layout`'s (AdamW's moments like their parameter, or whole on every
device). --constrain-activations pins each residual block's input and output to the
batch sharding once more (flax `intercept_methods`); the model already pins its
residual stream between blocks (`model.layers.constrain_batch`), so it changes little. The routed dispatch is `ragged` (what a GPU
runs) unless moe.dispatch is given. --top N lists the N largest temporaries of XLA's
buffer assignment (they need not be live at the same time).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import resource
import sys
import tempfile
import time

def parse_args(argv):
    p = argparse.ArgumentParser(prog="compile_train_plan", description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--config", default=os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "curricula", "perspective-1t.yaml"))
    p.add_argument("--stage", default="sparse")
    p.add_argument("--optimizer-state", default="trainer")
    p.add_argument("--constrain-activations", action="store_true")
    p.add_argument("--top", type=int, default=0)
    p.add_argument("--device-gib", type=float, default=80.0)
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    a.optimizer_state = a.optimizer_state.split(",")
    return a


def set_xla_flags(devices: int, dump_dir: str | None) -> None:
    """Host devices (and the optional dump) for the XLA about to start in this process."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith(("--xla_force_host_platform_device_count", "--xla_dump"))]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    if dump_dir:
        flags += [f"--xla_dump_to={dump_dir}", "--xla_dump_hlo_module_re=jit_step"]
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ["JAX_PLATFORMS"] = "cpu"


def largest_temporaries(dump_dir: str, n: int) -> list[dict]:
    """The n largest values XLA placed in the step's temporary allocation."""
    files = sorted(glob.glob(os.path.join(dump_dir, "*jit_step*buffer-assignment.txt")))
    if not files:
        return []
    text = open(files[-1], encoding="utf-8").read()
    temp = text[text.find("preallocated-temp"):]
    seen = {}
    for name, size, shape in re.findall(r"value: <\d+ (\S+) @\d+> \(size=(\d+),offset=\d+\): "
                                        r"(\S+)", temp):
        seen[name] = (int(size), shape)
    top = sorted(seen.items(), key=lambda kv: -kv[1][0])[:n]
    return [{"value": k, "bytes": s, "shape": sh} for k, (s, sh) in top]


def constrained(mesh, on: bool):
    """What-if: every ResidualBlock's input and output pinned to the batch sharding."""
    if not on:
        return contextlib.nullcontext()
    import flax.linen as nn
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from perspective_jax.model.transformer import ResidualBlock
    from perspective_jax.train.sharding import BATCH_AXES
    act = NamedSharding(mesh, P(BATCH_AXES, None, None))

    def pin(next_fun, args, kwargs, context):
        if not (isinstance(context.module, ResidualBlock) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        out = next_fun(jax.lax.with_sharding_constraint(args[0], act), *args[1:], **kwargs)
        return (jax.lax.with_sharding_constraint(out[0], act),) + tuple(out[1:])
    return nn.intercept_methods(pin)


def compile_step(cfg, mesh, layout: str, constrain: bool) -> dict:
    """Lower and compile the trainer's step on abstract inputs; XLA's figures."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from perspective_jax.model.transformer import abstract_params, logical_axes
    from perspective_jax.train import plan
    from perspective_jax.train import sharding as shd
    from perspective_jax.train.objective import make_apply_fns
    from perspective_jax.train.step import init_state, lr_schedule, make_optimizer, \
        make_train_step
    sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
    t0 = time.perf_counter()
    tx = make_optimizer(cfg.train)
    if layout == "trainer":            # as trainer._initial_state, then setup, build it
        params = abstract_params(cfg.model, cfg.moe)
        p_shard = shd.param_shardings(logical_axes(cfg.model, cfg.moe), params, mesh)
        init = jax.jit(lambda p: plan.initial_state(cfg, tx, p, mesh)).lower(
            jax.tree.map(sds, params, p_shard)).compile()
        state = jax.eval_shape(lambda p: init_state(p, tx), params)
        shardings = init.output_shardings
        if cfg.ternary.enabled and cfg.ternary.kd_weight > 0:
            state["teacher"], shardings["teacher"] = params, p_shard
    else:
        state, shardings = plan.state_layout(cfg, mesh, layout)
    found = {}
    for name in plan.OPTIMIZER_LAYOUTS:   # which layout the moments ended up in
        _, ref = plan.state_layout(cfg, mesh, name)
        found[name] = all(a.shard_shape(x.shape) == b.shard_shape(x.shape) for x, a, b in zip(
            jax.tree.leaves(state["opt_state"]), jax.tree.leaves(shardings["opt_state"]),
            jax.tree.leaves(ref["opt_state"])))
    moments = next((k for k, v in found.items() if v), "mixed")
    batch_sharding = NamedSharding(mesh, P(None, shd.BATCH_AXES, None))
    micro = cfg.train.batch_size // cfg.train.grad_accum
    batch = jax.ShapeDtypeStruct((cfg.train.grad_accum, micro, cfg.data.seq_len + 1),
                                 jnp.int32, sharding=batch_sharding)
    ce_weight = cfg.ternary.ce_weight if cfg.ternary.enabled else 1.0
    step = jax.jit(make_train_step(make_apply_fns(cfg)[0], tx, lr_schedule(cfg.train),
                                   ce_weight=ce_weight),
                   in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                   donate_argnums=(0,))
    t1 = time.perf_counter()
    with constrained(mesh, constrain):
        lowered = step.lower(jax.tree.map(sds, state, shardings), batch)
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    fields = ("argument", "output", "alias", "temp", "generated_code")
    out = {f: int(getattr(mem, f"{f}_size_in_bytes")) for f in fields}
    batch_bytes = plan.shard_bytes(batch, batch_sharding)
    return {"optimizer_state": layout, "moments_layout": moments,
            "constrain_activations": constrain, "memory": out, "batch_bytes": batch_bytes,
            "state_bytes": out["argument"] - batch_bytes,
            "peak_bytes": out["argument"] + out["temp"] + out["output"] - out["alias"]
            + out["generated_code"],
            "flops": cost.get("flops"), "setup_s": t1 - t0, "lower_s": t2 - t1,
            "compile_s": t3 - t2}


def run(argv=None) -> dict:
    a = parse_args(argv)
    dump = tempfile.mkdtemp(prefix="compile-train-plan-") if a.top else None
    set_xla_flags(a.devices, dump)
    import dataclasses
    import jax
    from perspective_jax.config import load_config
    from perspective_jax.errors import UserError
    from perspective_jax.train import plan
    from perspective_jax.train import sharding as shd
    from perspective_jax.train.stages import stage_config
    if a.stage not in plan.STAGES:
        raise UserError(f"--stage: {a.stage!r} runs no train step here; use one of "
                        f"{', '.join(plan.STAGES)}")
    layouts = ("trainer", *plan.OPTIMIZER_LAYOUTS)
    for layout in a.optimizer_state:
        if layout not in layouts:
            raise UserError(f"--optimizer-state: unknown {layout!r}; use one or more of "
                            f"{', '.join(layouts)}, comma-separated")
    cfg = stage_config(load_config(a.config, a.overrides), a.stage)
    if cfg.moe.dispatch == "auto":
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch="ragged"))
    mesh = shd.make_mesh(cfg.mesh, jax.devices())
    hw = plan.Hardware(device_gib=a.device_gib)
    report = {"config": a.config, "overrides": a.overrides, "stage": a.stage,
              "devices": a.devices, "mesh": dict(mesh.shape), "dispatch": cfg.moe.dispatch,
              "machine": f"{os.cpu_count()} CPU cores, jax {jax.__version__}", "runs": []}
    with jax.set_mesh(mesh):
        for layout in a.optimizer_state:
            r = compile_step(cfg, mesh, layout, a.constrain_activations)
            derived = plan.train_plan(cfg, a.devices, hw, r["moments_layout"]
                                      if r["moments_layout"] != "mixed" else "sharded")
            r["derived"] = {"state": sum(derived["state"].values()),
                            "step": sum(derived["step"].values()), "total": derived["total"],
                            "parts": {**derived["state"], **derived["step"]},
                            "hardware_flops_per_device": derived["time"]["hardware_flops"]
                            / a.devices}
            if dump:
                r["largest_temporaries"] = largest_temporaries(dump, a.top)
            report["runs"].append(r)
    report["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return report


def render(r: dict) -> str:
    from perspective_jax.model.census import human_bytes as g
    out = [f"# Compiled train step: {os.path.basename(r['config'])} {' '.join(r['overrides'])}"
           f" stage {r['stage']}, {r['devices']} fake CPU devices, mesh "
           + " × ".join(f"{k} {v}" for k, v in r["mesh"].items())
           + f", dispatch {r['dispatch']} ({r['machine']})", ""]
    for run in r["runs"]:
        m, d = run["memory"], run["derived"]
        out += [f"## optimizer state: {run['optimizer_state']} (moments found "
                f"{run['moments_layout']}), activations "
                + ("pinned to the batch sharding" if run["constrain_activations"] else
                   "as the model leaves them"), "",
                "| per device | derived | compiled |", "|---|---:|---:|",
                f"| state: params + optimizer (+ teacher) | {g(d['state'])} | "
                f"{g(run['state_bytes'])} (arguments {g(m['argument'])} less the batch "
                f"{g(run['batch_bytes'])}) |",
                f"| step: gradients + activations + logits + gathered weights | "
                f"{g(d['step'])} | {g(m['temp'])} (temporaries) |",
                f"| output not aliased to the donated state; generated code | — | "
                f"{g(m['output'] - m['alias'])}; {g(m['generated_code'])} |",
                f"| **total** | **{g(d['total'])}** | **{g(run['peak_bytes'])}** |",
                f"| FLOPs per device (derived: hardware, with remat) | "
                f"{d['hardware_flops_per_device']:.3g} | "
                + (f"{run['flops']:.3g}" if run["flops"] is not None else "n/a") + " |", "",
                f"setup {run['setup_s']:.1f} s, lowering {run['lower_s']:.1f} s, compile "
                f"{run['compile_s']:.1f} s", ""]
        if run.get("largest_temporaries"):
            out += ["| largest temporaries | size | shape |", "|---|---:|---|"]
            out += [f"| {t['value']} | {g(t['bytes'])} | `{t['shape']}` |"
                    for t in run["largest_temporaries"]] + [""]
    out.append(f"peak RSS of this process: {g(r['peak_rss_bytes'])}")
    return "\n".join(out)


def main(argv=None) -> int:
    from perspective_jax.errors import UserError
    try:
        r = run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=2) if parse_args(argv).json else render(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
