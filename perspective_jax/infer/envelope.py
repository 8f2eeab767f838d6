"""Projected device / RAM / disk envelope and decode speed of a config (SPEC §3.5, §5).

`envelope(config, Assumptions(...))` returns every figure `perspective-budget`
prints. Every size comes from the config: parameter shapes from `jax.eval_shape`
of the real model (`census`, `abstract_params`, `logical_axes`), decode-state
shapes from `init_cache`, neighbour counts from the torus lattice. Nothing is
allocated. The envelope describes the exported routed model (one expert per PDR
layer), so a config with `model.routed: false` is counted as if routed.

Units: memory footprints and the *_mb budgets are MiB (2^20 B, as GPU and RAM
sizes are quoted); expert-layer and disk sizes also in decimal MB/GB (10^6,
10^9 B, as SPEC quotes 27.05 MB); bandwidths in GB/s = 10^9 B/s.

Speed model (per decoded token, batch 1): the expert layers run in order; while
expert layer l computes, the double buffer's other slot receives layer l+1, so
each expert layer costs max(transfer, compute) where compute = (active FLOPs /
device_tflops + device bytes read / device_gbs) / expert layers (the non-expert
layers' work is spread evenly over them). Transfers: same expert → nothing;
lattice neighbour → a delta (delta_share of a full expert-layer); otherwise a
full load. A host-cache miss (probability 1 − hit_rate; default: the share of
all expert-layers the cache holds, i.e. uniform routing) first reads the bytes
from disk, not overlapped with its PCIe copy.

Wire format "base3" (5 trits per byte, SPEC §3.4) is a what-if projection: the
model directory stores 2-bit codes (`modeldir/format.py`), which the kernel reads
directly.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import PartitionSpec

from kernels_pallas.ternary_matmul import DEQUANT_BLOCK_BYTES
from perspective_jax.model import census
from perspective_jax.model.routed_ffn import NEXT_TOKEN_PREDICTOR, PREDICTOR
from perspective_jax.model.transformer import abstract_params, init_cache, logical_axes
from perspective_jax.moe.torus import lattice_neighbours, neighbour_pairs
from perspective_jax.quant import embedding_int8

MIB, MB, GB = 2 ** 20, 1e6, 1e9
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
DESIGN_DEVICE_MB, DESIGN_RAM_MB, GATE_TOK_S = 2684, 26000, 12.0   # SPEC §3.5 / §5
PREDICTOR_HEADS = "expert-predictor heads (float32)"
EMBEDDING = {"float32": "embedding float32 (export --embedding float32)",
             "int8": "embedding int8 + row scale (SPEC §3.4)"}
WIRE_FORMATS = ("2bit", "base3")


@dataclasses.dataclass(frozen=True)
class Assumptions:
    """Hardware, runtime and routing assumptions of a projection (the defaults are
    `perspective-budget`'s; its --help says what each one means)."""
    device_mb: float = 4096.0
    ram_mb: float = 32768.0
    pcie_gbs: float = 7.0
    disk_gbs: float = 6.0
    same: float = 0.3
    neighbour: float = 0.4
    full: float = 0.3
    device_target_mb: float = DESIGN_DEVICE_MB
    ram_target_mb: float = DESIGN_RAM_MB
    device_reserve_mb: float = 512.0
    host_reserve_mb: float = 2048.0
    host_cache_mb: float | None = None
    group_size: int = 64
    group_bytes: int = 4
    embedding: str = "int8"
    state_dtype: str = "float32"
    workspace_factor: float = 2.0
    wire_format: str = "2bit"
    region_align: int = 4096
    delta_share: float = 0.1
    hit_rate: float | None = None
    device_tflops: float = 7.0
    device_gbs: float = 192.0


def _leaves(cfg, moe):
    """(path, shape, logical axes) of every parameter."""
    params = jax.tree_util.tree_flatten_with_path(abstract_params(cfg, moe))[0]
    axes = jax.tree.leaves(logical_axes(cfg, moe), is_leaf=lambda x: isinstance(x, PartitionSpec))
    return [(jax.tree_util.keystr(p), leaf.shape, tuple(ax))
            for (p, leaf), ax in zip(params, axes)]


def _matrix(shape, axes):
    """(stack, K, N) of a kernel: K = contracted input (everything before a final
    'embed' axis for output projections, else the first axis)."""
    stack = math.prod(n for n, a in zip(shape, axes) if a in ("layers", "expert"))
    dims = [(n, a) for n, a in zip(shape, axes) if a not in ("layers", "expert")]
    k = math.prod(n for n, _ in dims[:-1]) if dims[-1][1] == "embed" else dims[0][0]
    return stack, k, math.prod(n for n, _ in dims) // k


def weights(cfg, moe, a, granularity: str = "tensor"):
    """Inference-precision bytes of the shared weights and of one expert-layer. Expert
    scales are float32, one per matrix (`granularity` "tensor") or per output column
    ("row"); the engine keeps those of every expert on the device with the shared
    weights ("expert scales"), and an expert-layer's size includes its own."""
    shared = {"2-bit GPTQ codes": 0, "GPTQ group scale+zero": 0, EMBEDDING[a.embedding]: 0,
              "norms, biases, routers (float32)": 0, "expert scales, all experts (float32)": 0,
              PREDICTOR_HEADS: 0}
    expert = {"2bit": 0, "base3": 0, "codes": 0, "matrices": 0, "trits": 0, "scales": 0}
    for path, shape, axes in _leaves(cfg, moe):
        if "expert" in axes and "router" not in path:          # one expert-layer's share
            stack, k, n = _matrix(shape, axes)                 # summed over all of them
            scales = 4 * (n if granularity == "row" else 1)    # per matrix
            expert["codes"] += stack * math.ceil(k / 4) * n
            expert["2bit"] += stack * (math.ceil(k / 4) * n + scales)
            expert["base3"] += stack * (math.ceil(k * n / 5) + scales)
            expert["scales"] += stack * scales
            expert["matrices"] += stack
            expert["trits"] += stack * k * n
            shared["expert scales, all experts (float32)"] += stack * scales
        elif "embed" in path and "periods" not in path:
            v, d = shape
            n_blocks, rows = embedding_int8.block_shape(v, embedding_int8.BLOCK_ROWS)
            shared[EMBEDDING[a.embedding]] += 4 * v * d if a.embedding == "float32" \
                else n_blocks * rows * (d + 4)          # the engine's padded blocks
        elif f"'{PREDICTOR}'" in path or f"'{NEXT_TOKEN_PREDICTOR}'" in path:
            shared[PREDICTOR_HEADS] += 4 * math.prod(shape)     # exported as they are
        elif "router" in path or len([x for x in axes if x != "layers"]) < 2:
            shared["norms, biases, routers (float32)"] += 4 * math.prod(shape)
        else:
            stack, k, n = _matrix(shape, axes)
            shared["2-bit GPTQ codes"] += stack * math.ceil(k / 4) * n
            shared["GPTQ group scale+zero"] += stack * math.ceil(k / a.group_size) * n \
                * a.group_bytes
    n_xl = cfg.n_pdr_layers * moe.num_experts
    return shared, {k: v // n_xl for k, v in expert.items()}    # per expert-layer


def decode_state(cfg, a):
    """Bytes of the batch-1 decode cache (PDR states, GQA KV rings, positions, the
    routers' context averages)."""
    out = {"PDR states": 0, "GQA KV ring caches": 0, "positions": 0,
           "router context averages": 0}
    tree = jax.eval_shape(lambda: init_cache(cfg, 1))
    items = {"state": "PDR states", "k": "GQA KV ring caches", "v": "GQA KV ring caches",
             "pos": "positions", "route": "router context averages"}  # PDRCache / KVCache
    leaves = [("positions", tree["next_pos"])]
    for layer in tree["periods"].values():
        leaves += [(items[name], leaf) for name, leaf in layer._asdict().items()]
    for item, leaf in leaves:
        floating = jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating)
        size = ITEMSIZE[a.state_dtype] if floating and a.state_dtype != "config" \
            else leaf.dtype.itemsize
        out[item] += math.prod(leaf.shape) * size
    return out


def envelope(pc, a: Assumptions) -> dict:
    """The envelope report of the loaded config `pc` under the assumptions `a`."""
    cfg, moe = pc.model, pc.moe
    if not cfg.routed:
        cfg = dataclasses.replace(cfg, routed=True)
    info = census.summary(cfg, moe)
    n_exp_layers, n_exp = cfg.n_pdr_layers, moe.num_experts
    shared, expert = weights(cfg, moe, a, pc.ternary.scale_granularity)
    state = decode_state(cfg, a)
    xl = expert["2bit"] if a.wire_format == "2bit" else expert["base3"]   # wire bytes
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    widest = max(3 * f + 2 * d,                                           # SwiGLU + x, norm(x)
                 2 * cfg.n_heads * cfg.head_dim + 2 * cfg.n_kv_heads * cfg.head_dim
                 + cfg.n_heads * cfg.window + 2 * d,                      # q,k,v,o + scores
                 5 * d + 2 * cfg.pdr_rank)                                # PDR p,γ,v,Sq,x + k,q
    lut = math.ceil(max(d, f) / 4) * 256 * 4          # T-MAC partial sums of the XLA path
    workspace = int(a.workspace_factor * (4 * (widest + 2 * v) + lut))
    shared_bytes = sum(shared.values())
    device = {
        f"shared weights (2-bit GPTQ + {a.embedding} embedding + f32)": shared_bytes,
        "expert double buffer (2 slots, 2-bit codes)": 2 * expert["codes"],
        "base-3 staging slot (on-device unpack)": expert["base3"] * (a.wire_format == "base3"),
        "decode state: PDR states": state["PDR states"],
        "decode state: GQA KV rings + positions": state["GQA KV ring caches"] + state["positions"],
        "activation workspace": workspace,
        # one call runs at a time: the larger of the int8 head's float32 row block
        # and an accelerator prefill's dequantised expert block
        "largest call temporary (int8 head block / prefill dequant block)": max(
            4 * embedding_int8.block_shape(v, embedding_int8.BLOCK_ROWS)[1] * d
            * (a.embedding == "int8"),
            DEQUANT_BLOCK_BYTES),
        "runtime reserve (--device-reserve-mb)": int(a.device_reserve_mb * MIB),
    }
    device_total = sum(device.values())
    fixed_host = {
        "process + runtime (--host-reserve-mb)": int(a.host_reserve_mb * MIB),
        "shared weights staging copy (released after upload)": 0,
        "pinned PCIe staging (2 expert-layers)": 2 * xl,
        "routing tables: freq L×E int64 + transitions L×E×E f32":
            8 * n_exp_layers * n_exp + 4 * n_exp_layers * n_exp * n_exp,
    }
    room = min(a.ram_target_mb, a.ram_mb) * MIB - sum(fixed_host.values())
    cache = max(0, room if a.host_cache_mb is None else min(room, a.host_cache_mb * MIB))
    all_xl = n_exp_layers * n_exp
    cached = min(int(cache // xl), all_xl)                   # never more than exists
    host = dict(fixed_host, **{"host expert cache": cached * xl})
    host_total = sum(host.values())
    hit = cached / all_xl if a.hit_rate is None else a.hit_rate
    directed = sum(len(n) for n in lattice_neighbours(moe.lattice))
    # Regions hold the codes; the per-matrix scales live with the shared weights.
    stride = -(-(expert[a.wire_format] - expert["scales"]) // a.region_align) \
        * a.region_align
    disk = {
        f"expert store ({a.wire_format}, {a.region_align} B-aligned regions)": all_xl * stride,
        "expert store, other format (" + ("base3" if a.wire_format == "2bit" else "2bit") + ")":
            all_xl * expert["base3" if a.wire_format == "2bit" else "2bit"],
        "neighbour deltas (directed, --delta-share)":
            int(n_exp_layers * directed * a.delta_share * xl),
        "shared weights (inference precision)": shared_bytes,
    }
    # --- speed ---------------------------------------------------------------------
    flops = 2 * info["active_params_per_token"] + n_exp_layers * 4 * d * cfg.pdr_rank \
        + cfg.n_gqa_layers * 4 * cfg.n_heads * cfg.head_dim * cfg.window
    reads = {"shared weights": shared_bytes, "active experts": n_exp_layers * expert["2bit"],
             "decode state (PDR read+write, KV read)":
                 2 * state["PDR states"] + state["GQA KV ring caches"]}
    t_flops, t_mem = flops / (a.device_tflops * 1e12), sum(reads.values()) / (a.device_gbs * GB)
    c = (t_flops + t_mem) / n_exp_layers                  # compute per expert layer, s

    def per_layer(same, nb, full, h):
        """Expected seconds per expert layer for these transfer shares and hit rate."""
        def load(nbytes):
            pcie, dsk = nbytes / (a.pcie_gbs * GB), nbytes / (a.disk_gbs * GB)
            return h * max(pcie, c) + (1 - h) * max(dsk + pcie, c)
        return same * c + nb * load(a.delta_share * xl) + full * load(xl)

    t_layer = per_layer(a.same, a.neighbour, a.full, hit)
    tok_s = 1.0 / (n_exp_layers * t_layer)
    stall = 1.0 - c / t_layer                 # share of the time spent waiting on transfers
    bound = ("expert transfers (PCIe + disk)" if stall > 0.5 else
             "device compute (" + ("memory bandwidth" if t_mem > t_flops else "FLOPs") + ")")
    target = 1.0 / (GATE_TOK_S * n_exp_layers)
    rest = a.same + a.neighbour

    def max_full(h):                                      # keep same:neighbour ratio
        base = per_layer(a.same / rest, a.neighbour / rest, 0, h) if rest else c
        full = per_layer(0, 0, 1, h)
        return 1.0 if full <= target else max(0.0, (target - base) / (full - base)) \
            if base < target else 0.0

    need_hit = None
    t0, t1 = per_layer(a.same, a.neighbour, a.full, 0), per_layer(a.same, a.neighbour, a.full, 1)
    if t1 <= target:
        need_hit = 0.0 if t0 <= target else (t0 - target) / (t0 - t1)
    speed = {
        "flops_per_token": flops, "device_bytes_read_per_token": reads,
        "compute_ms_per_token": 1e3 * (t_flops + t_mem), "compute_ms_flops": 1e3 * t_flops,
        "compute_ms_memory": 1e3 * t_mem, "compute_ms_per_expert_layer": 1e3 * c,
        "full_load_pcie_ms": 1e3 * xl / (a.pcie_gbs * GB),
        "full_load_disk_ms": 1e3 * xl / (a.disk_gbs * GB),
        "base3_pcie_ms": 1e3 * expert["base3"] / (a.pcie_gbs * GB),
        "hit_rate": hit, "ms_per_expert_layer": 1e3 * t_layer, "tok_s": tok_s, "bound": bound,
        "transfer_stall_share": stall,
        "tok_s_compute_only": 1.0 / (t_flops + t_mem),
        "tok_s_all_full_cached": 1.0 / (n_exp_layers * per_layer(0, 0, 1, 1)),
        "tok_s_all_full_from_disk": 1.0 / (n_exp_layers * per_layer(0, 0, 1, 0)),
        "gate_tok_s": GATE_TOK_S, "meets_gate": tok_s >= GATE_TOK_S,
        "max_full_share_for_gate_at_hit_rate": max_full(hit),
        "max_full_share_for_gate_all_cached": max_full(1.0),
        "hit_rate_needed_for_gate": need_hit,
    }
    return {
        "config": pc.name, "routed_forced": not pc.model.routed,
        "params": {k: info[k] for k in ("shared_params", "expert_params", "total_params",
                                         "active_params_per_token")},
        "expert_layers": n_exp_layers, "experts": n_exp, "lattice": list(moe.lattice),
        "neighbour_pairs": len(neighbour_pairs(moe.lattice)), "directed_neighbours": directed,
        "expert_layer": {"trits": expert["trits"], "matrices": expert["matrices"],
                         "bytes_2bit": expert["2bit"], "bytes_base3": expert["base3"],
                         "wire_bytes": xl},
        "shared_weights": shared, "decode_state": state, "workspace_bytes": workspace,
        "device": device, "device_total": device_total,
        "device_budget": a.device_mb * MIB, "device_target": a.device_target_mb * MIB,
        "host": host, "host_total": host_total, "host_cache_expert_layers": cached,
        "host_cache_share": cached / all_xl,
        "ram_budget": a.ram_mb * MIB, "ram_target": a.ram_target_mb * MIB,
        "disk": disk, "disk_total": sum(v for k, v in disk.items() if "other" not in k),
        "fits_envelope": device_total <= a.device_mb * MIB and host_total <= a.ram_mb * MIB,
        "fits_targets": device_total <= a.device_target_mb * MIB
        and host_total <= a.ram_target_mb * MIB,
        "speed": speed, "flags": dataclasses.asdict(a),
    }
