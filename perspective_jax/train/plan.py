"""The training plan of a config on a device mesh: per-device memory and step time.

    p = train_plan(cfg, n_devices=1024, hw=Hardware(device_gib=80, mfu=0.4))   # a dict

Nothing is allocated and no device is needed: the mesh is a `jax.sharding.AbstractMesh`
of the sizes `train.sharding.mesh_shape` resolves from `mesh.*`, and every parameter's
shard is the one `train.sharding.param_shardings` gives its abstract shape — the
trainer's own rules, so a dimension the mesh does not divide counts whole.

Per device (n = tokens of the micro-batch on one device = micro / (data·fsdp·expert)
× seq_len; t = mesh.tensor; a size divides by t only where the trainer shards it):

    state        params + AdamW m, v (sharded like the params, or replicated)
                 [+ the frozen teacher of a distilling ternary stage]
    gradients    GRAD_COPIES × the parameter shards (the step's accumulator
                 and the averaged copy the clip and AdamW read; one more per extra
                 micro-batch with train.grad_accum > 1)
    activations  remat=full: the n_periods period inputs in model.dtype and the
                 float32 copy XLA makes of them for the backward scan, plus one
                 period's working set while it is recomputed (`period_bytes`);
                 remat none/dots: every period's working set
    logits       n × V/t × 4 B × LOGIT_COPIES
    gathered     the largest layer's weights all-gathered over fsdp (model.dtype)
                 with their float32 gradient before the reduce-scatter

Step time = 3·forward FLOPs per token (`census.train_flops_per_token`: 6·N_active
plus PDR and windowed attention) × batch tokens / (devices × peak × MFU); remat=full
recomputes the forward, so the hardware executes 4·forward.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from perspective_jax.config import PerspectiveConfig
from perspective_jax.errors import UserError
from perspective_jax.model import census
from perspective_jax.model.footprint import ITEMSIZE, LOGIT_COPIES, check_dimensions
from perspective_jax.model.transformer import abstract_params, logical_axes
from perspective_jax.train import sharding as shd
from perspective_jax.train.step import init_state, make_optimizer

GIB = 2 ** 30
F32 = 4
GRAD_COPIES = 2                 # accumulator + averaged copy (XLA's memory analysis)
OPTIMIZER_LAYOUTS = ("sharded", "replicated")
DEFAULT_PEAK_TFLOPS = 989.0     # H100 SXM 80 GB, bfloat16 dense
STAGES = ("dense", "sparse", "ternary", "align")   # the stages that run the train step


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One device of the mesh: memory (GiB, of which `mem_fraction` is XLA's), peak
    TFLOPS and the model-FLOPs utilisation the step time assumes."""
    device_gib: float = 80.0
    mem_fraction: float = 0.9
    peak_tflops: float = DEFAULT_PEAK_TFLOPS
    mfu: float = 0.4

    def __post_init__(self):
        for name, lo in (("device_gib", 0.0), ("peak_tflops", 0.0)):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > lo):
                raise UserError(f"Hardware.{name} must be a positive number, got {v}")
        for name in ("mem_fraction", "mfu"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0.0 < v <= 1.0):
                raise UserError(f"Hardware.{name} must lie in (0, 1], got {v}")


# ------------------------------------------------------------------ the layout
def abstract_mesh(cfg: PerspectiveConfig, n_devices: int) -> AbstractMesh:
    """The trainer's mesh for `n_devices`, without devices (same errors as `make_mesh`)."""
    if n_devices < 1:
        raise UserError(f"--devices must be at least 1, got {n_devices}")
    return AbstractMesh(shd.mesh_shape(cfg.mesh, n_devices), shd.MESH_AXES)


def state_layout(cfg: PerspectiveConfig, mesh, optimizer: str = "sharded"):
    """(abstract train state, its NamedShardings): params by the trainer's rules; AdamW's
    moments like their parameter ("sharded") or whole on every device ("replicated");
    scalars replicated; a distilling stage's teacher like the params. `mesh` is a real
    or an abstract mesh."""
    if optimizer not in OPTIMIZER_LAYOUTS:
        raise UserError(f"unknown optimizer-state layout {optimizer!r}; use one of "
                        f"{OPTIMIZER_LAYOUTS}")
    params = abstract_params(cfg.model, cfg.moe)
    p_shard = shd.param_shardings(logical_axes(cfg.model, cfg.moe), params, mesh)
    state = jax.eval_shape(lambda p: init_state(p, make_optimizer(cfg.train)), params)
    by_path = {jax.tree_util.keystr(k): (a.shape, s) for (k, a), s in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(p_shard))}
    whole = NamedSharding(mesh, P())

    def moment(path, leaf):
        if optimizer == "sharded":
            for i in range(len(path)):               # the parameter this leaf mirrors
                shape, s = by_path.get(jax.tree_util.keystr(path[i:]), (None, None))
                if shape == leaf.shape:
                    return s
        return whole

    shardings = {"step": whole, "params": p_shard,
                 "opt_state": jax.tree_util.tree_map_with_path(moment, state["opt_state"])}
    if cfg.ternary.enabled and cfg.ternary.kd_weight > 0:
        state["teacher"], shardings["teacher"] = params, p_shard
    return state, shardings


def initial_state(cfg: PerspectiveConfig, tx, params, mesh) -> dict:
    """`init_state(params, tx)` placed by `state_layout(cfg, mesh)` — what the trainer
    and the stages that write a step-0 run start from. Without `out_shardings` XLA
    leaves AdamW's moments whole on every device (2× the parameters per device)."""
    _, shardings = state_layout(cfg, mesh, "sharded")
    shardings = {k: shardings[k] for k in ("step", "params", "opt_state")}
    return jax.jit(lambda p: init_state(p, tx), out_shardings=shardings)(params)


def shard_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` laid out by `shardings` (same structure)."""
    return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
               for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def layout_summary(tree, shardings) -> dict:
    """Leaves, and leaves (and their bytes) left whole on every device although > 1 element."""
    whole = [a for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))
             if math.prod(a.shape) > 1 and s.shard_shape(a.shape) == a.shape]
    return {"leaves": len(jax.tree.leaves(tree)), "replicated_leaves": len(whole),
            "replicated_bytes": sum(math.prod(a.shape) * a.dtype.itemsize for a in whole)}


def gathered_layer_bytes(cfg: PerspectiveConfig, mesh, params, p_shard) -> int:
    """The largest layer's weights gathered over fsdp (model.dtype) plus their float32
    gradient before the reduce-scatter."""
    fsdp = mesh.shape["fsdp"]
    per_layer: dict = {}
    for (path, a), s in zip(jax.tree_util.tree_leaves_with_path(params),
                            jax.tree.leaves(p_shard)):
        keys = [getattr(k, "key", None) for k in path]
        if keys[0] != "periods":
            continue
        n = math.prod(s.shard_shape(a.shape)) // cfg.model.n_periods
        n *= fsdp if "fsdp" in jax.tree.leaves(tuple(s.spec)) else 1
        per_layer[keys[1]] = per_layer.get(keys[1], 0) + n
    return max(per_layer.values(), default=0) * (ITEMSIZE[cfg.model.dtype] + F32)


# ---------------------------------------------------------------- activations
def _split(n: int, t: int) -> float:
    """n per device when the trainer shards it over t (only if t divides it)."""
    return n / t if n % t == 0 else n


def period_bytes(cfg: PerspectiveConfig, t: int) -> dict:
    """Bytes per token that one period's backward holds, by layer kind, each tensor in
    the dtype the model computes it in (model.dtype for the residual stream, norms,
    projections and FFN hiddens; float32 for the PDR recurrence, attention scores and
    the router), the dimensions the tensor axis shards (pdr_rows, heads, mlp) divided
    by t."""
    m, moe = cfg.model, cfg.moe
    dt = ITEMSIZE[m.dtype]
    d, r, c = m.d_model, m.pdr_rank, m.pdr_chunk
    rows = _split(d, t)
    heads, kv = _split(m.n_heads, t), _split(m.n_kv_heads, t)
    common = 5 * d * dt                              # residual, norms, mixer / FFN out
    pdr = (4 * rows + 2 * r + rows * r / c + 2 * c) * F32   # p, decay, v, y; k, q; states
    gqa = 3 * (heads + kv) * m.head_dim * dt + 2 * heads * (
        m.window + min(m.window, cfg.data.seq_len)) * F32   # q, k, v; scores, probs
    ffn = (3 * _split(m.d_ff, t) + d) * dt           # SwiGLU gate, up, hidden; output
    out = {"pdr": 0.0, "gqa": 0.0}
    for kind in m.layer_pattern:
        routed = kind == "pdr" and m.routed
        out[kind] += common + (pdr if kind == "pdr" else gqa) + ffn + (
            2 * d * dt + (moe.num_experts + 8) * F32 if routed else 0)  # sorted, router
    return out


def activation_parts(cfg: PerspectiveConfig, tokens: int, t: int) -> dict:
    """Bytes of the activations one device keeps for `tokens` tokens (module docstring)."""
    m = cfg.model
    period = int(sum(period_bytes(cfg, t).values()) * tokens)
    if m.remat != "full":
        return {"every period's intermediates": m.n_periods * period}
    inputs = m.n_periods * tokens * m.d_model
    parts = {"period inputs (remat)": inputs * ITEMSIZE[m.dtype]}
    if ITEMSIZE[m.dtype] != F32:         # the backward scan reads them upcast, all at once
        parts["period inputs, float32 copy"] = inputs * F32
    return {**parts, "one period recomputed": period}


# ---------------------------------------------------------------- the plan
def micro_per_device(cfg: PerspectiveConfig, mesh) -> int:
    """Sequences of one micro-batch on one device; the trainer's divisibility check."""
    divisor = math.prod(mesh.shape[a] for a in shd.BATCH_AXES)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % divisor:
        raise UserError(f"micro-batch {micro} (train.batch_size / train.grad_accum) is not "
                        f"divisible by the {divisor} data-parallel shards of the mesh "
                        f"{dict(mesh.shape)}")
    return micro // divisor


def step_time(cfg: PerspectiveConfig, n_devices: int, hw: Hardware) -> dict:
    """FLOPs per step and the step time at `hw.mfu` of `hw.peak_tflops` per device."""
    per_token = census.train_flops_per_token(cfg.model, cfg.data.seq_len)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    flops = per_token * tokens
    recompute = {"full": 4 / 3, "dots": 1.0, "none": 1.0}[cfg.model.remat]
    seconds = flops / (n_devices * hw.peak_tflops * 1e12 * hw.mfu)
    return {"flops_per_token": per_token, "tokens_per_step": tokens, "model_flops": flops,
            "hardware_flops": flops * recompute, "model_flops_per_device": flops / n_devices,
            "step_s": seconds, "tokens_per_s": tokens / seconds,
            "train_hours": cfg.train.steps * seconds / 3600}


def train_plan(cfg: PerspectiveConfig, n_devices: int, hw: Hardware = Hardware(),
               optimizer: str = "sharded") -> dict:
    """Per-device memory of one train step of `cfg` (as `stage_config` makes it) on
    `n_devices`, and its step time (module docstring). What --train --json prints."""
    check_dimensions(cfg)
    mesh = abstract_mesh(cfg, n_devices)
    seqs = micro_per_device(cfg, mesh)
    tokens = seqs * cfg.data.seq_len
    t = mesh.shape["tensor"]
    state, shardings = state_layout(cfg, mesh, optimizer)
    params = shard_bytes(state["params"], shardings["params"])
    accum = cfg.train.grad_accum
    state_parts = {"parameters": params,
                   "optimizer state (AdamW m, v)": shard_bytes(state["opt_state"],
                                                               shardings["opt_state"])}
    if "teacher" in state:
        state_parts["teacher (frozen copy)"] = params
    vocab = cfg.model.vocab_size
    logits_t = t if shd.spec_for(P("vocab"), (vocab,), mesh) == P("tensor") else 1
    step_parts = {"gradients": params * (GRAD_COPIES + (accum > 1)),
                  **{f"activations: {k}": v for k, v in activation_parts(cfg, tokens,
                                                                         t).items()},
                  "logits (float32)": int(tokens * (vocab / logits_t) * F32 * LOGIT_COPIES),
                  "fsdp-gathered weights, largest layer": gathered_layer_bytes(
                      cfg, mesh, state["params"], shardings["params"])}
    total = sum(state_parts.values()) + sum(step_parts.values())
    usable = int(hw.device_gib * hw.mem_fraction * GIB)
    info = census.summary(cfg.model, cfg.moe)
    return {"config": cfg.name, "stage_routed": cfg.model.routed, "n_devices": n_devices,
            "mesh": dict(mesh.shape), "optimizer_layout": optimizer,
            "batch": {"batch_size": cfg.train.batch_size, "grad_accum": accum,
                      "seq_len": cfg.data.seq_len, "sequences_per_device": seqs,
                      "tokens_per_device": tokens,
                      "batch_shards": math.prod(mesh.shape[a] for a in shd.BATCH_AXES)},
            "model": {"total_params": info["total_params"],
                      "active_params_per_token": info["active_params_per_token"],
                      "param_dtype": cfg.model.param_dtype, "dtype": cfg.model.dtype,
                      "remat": cfg.model.remat, "n_periods": cfg.model.n_periods},
            "layout": {"params": layout_summary(state["params"], shardings["params"])},
            "state": state_parts, "step": step_parts, "total": total,
            "device_bytes": int(hw.device_gib * GIB), "usable_bytes": usable,
            "fits": total <= usable, "time": step_time(cfg, n_devices, hw),
            "hardware": dataclasses.asdict(hw)}
