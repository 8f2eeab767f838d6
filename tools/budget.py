"""Device / host / disk budget and projected decode speed of a config (SPEC §3.5, §5).

    .venv/bin/python tools/budget.py --config curricula/perspective-1t.yaml \
        --device-mb 4096 --ram-mb 32768 --pcie-gbs 7 --disk-gbs 6 [--json] \
        [--same 0.3 --neighbour 0.4 --full 0.3] [--hit-rate H] [--delta-share 0.1] ...

Every size comes from the config: parameter shapes from `jax.eval_shape` of the
real model (`census`, `abstract_params`, `logical_axes`), decode-state shapes
from `init_cache`, neighbour counts from the torus lattice. Nothing is
allocated. The budget describes the exported routed model (one expert per PDR
layer), so a config with `model.routed: false` is counted as if routed.

Units: memory footprints and the --*-mb budgets are MiB (2^20 B, as GPU and RAM
sizes are quoted); expert-layer and disk sizes also in decimal MB/GB (10^6,
10^9 B, as SPEC quotes 27.05 MB); bandwidths in GB/s = 10^9 B/s.

Speed model (per decoded token, batch 1): the expert layers run in order; while
expert layer l computes, the double buffer's other slot receives layer l+1, so
each expert layer costs max(transfer, compute) where compute = (active FLOPs /
--device-tflops + device bytes read / --device-gbs) / expert layers (the
non-expert layers' work is spread evenly over them). Transfers: same expert →
nothing; lattice neighbour → a delta (--delta-share of a full expert-layer);
otherwise a full load. A host-cache miss (probability 1 − --hit-rate; default:
the share of all expert-layers the cache holds, i.e. uniform routing) first
reads the bytes from disk, not overlapped with its PCIe copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import jax  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402

from kernels_pallas.ternary_matmul import DEQUANT_BLOCK_BYTES  # noqa: E402
from perspective_jax.model import census  # noqa: E402
from perspective_jax.cli.common import cli_entry, finite_float  # noqa: E402
from perspective_jax.config import load_config  # noqa: E402
from perspective_jax.errors import UserError  # noqa: E402
from perspective_jax.quant import embedding_int8  # noqa: E402
from perspective_jax.model.transformer import (abstract_params, init_cache,  # noqa: E402
                                               logical_axes)
from perspective_jax.moe.torus import lattice_neighbours, neighbour_pairs  # noqa: E402

MIB, MB, GB = 2 ** 20, 1e6, 1e9
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
DESIGN_DEVICE_MB, DESIGN_RAM_MB, GATE_TOK_S = 2684, 26000, 12.0   # SPEC §3.5 / §5


class _Parser(argparse.ArgumentParser):
    def error(self, message):                     # one line, exit 2 via cli_entry
        raise UserError(message)


def parse_args(argv):
    p = _Parser(description=__doc__.splitlines()[0])
    f = p.add_argument
    f("--config", default=os.path.join(REPO, "curricula", "perspective-1t.yaml"))
    f("overrides", nargs="*", metavar="section.key=value")
    f("--json", action="store_true", help="print one JSON object instead of tables")
    for name, default in (("device-mb", 4096.0), ("ram-mb", 32768.0), ("pcie-gbs", 7.0),
                          ("disk-gbs", 6.0), ("same", 0.3), ("neighbour", 0.4), ("full", 0.3)):
        f("--" + name, type=finite_float, default=default)
    f("--device-target-mb", type=finite_float, default=DESIGN_DEVICE_MB,
      help="SPEC design target")
    f("--ram-target-mb", type=finite_float, default=DESIGN_RAM_MB, help="SPEC design target; "
      "the host cache fills RAM up to min(this, --ram-mb)")
    f("--device-reserve-mb", type=finite_float, default=512.0,
      help="CUDA context + cuBLAS/XLA workspaces + allocator slack (typ. 300-500 MiB)")
    f("--host-reserve-mb", type=finite_float, default=2048.0,
      help="Python + JAX/XLA + CUDA driver host side of the inference process")
    f("--host-cache-mb", type=finite_float, default=None, help="cap on the host expert cache")
    f("--group-size", type=int, default=64, help="GPTQ rows per scale+zero group")
    f("--group-bytes", type=int, default=4, help="bytes of one group's scale + zero per "
      "output column: 4 = fp16 + fp16, 8 = float32 + float32")
    f("--embedding", default="int8", choices=list(EMBEDDING),
      help="embedding/head format on the device: int8 with one float32 scale per row is "
      "what perspective-export --shared-bits writes (SPEC §3.4); float32 is "
      "--embedding float32")
    f("--state-dtype", default="float32", choices=[*ITEMSIZE, "config"])
    f("--workspace-factor", type=finite_float, default=2.0,
      help="multiplier on the live activation vectors for XLA temporaries")
    f("--wire-format", default="2bit", choices=["2bit", "base3"],
      help="expert format on disk, in the host cache and over PCIe")
    f("--region-align", type=int, default=4096, help="expert-region alignment on disk")
    f("--delta-share", type=finite_float, default=0.1, help="mean delta / full expert-layer")
    f("--hit-rate", type=finite_float, default=None, help="host-cache hit rate of loads")
    f("--device-tflops", type=finite_float, default=7.0,
      help="RTX 3050 Laptop 4 GB class: 2048 CUDA cores x 2 x ~1.7 GHz")
    f("--device-gbs", type=finite_float, default=192.0,
      help="RTX 3050 Laptop 4 GB class: 128-bit GDDR6 at 12 Gbps")
    a = p.parse_args(argv)
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    for name, value in vars(a).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise UserError(f"{flag(name)} must be >= 0, got {value}")
        if name in ("pcie_gbs", "disk_gbs", "device_tflops", "device_gbs", "group_size",
                    "group_bytes", "region_align") and value == 0:
            raise UserError(f"{flag(name)} must be > 0")
        if name in ("same", "neighbour", "full", "delta_share", "hit_rate") and (value or 0) > 1:
            raise UserError(f"{flag(name)} must lie in [0, 1], got {value}")
    total = a.same + a.neighbour + a.full
    if abs(total - 1.0) > 1e-6:
        raise UserError(f"--same + --neighbour + --full must sum to 1, got "
                        f"{a.same:g} + {a.neighbour:g} + {a.full:g} = {total:g}")
    return a


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


EMBEDDING = {"float32": "embedding float32 (export --embedding float32)",
             "int8": "embedding int8 + row scale (SPEC §3.4)"}


def weights(cfg, moe, a, granularity: str = "tensor"):
    """Inference-precision bytes of the shared weights and of one expert-layer. Expert
    scales are float32, one per matrix (`granularity` "tensor") or per output column
    ("row"); the engine keeps those of every expert on the device with the shared
    weights ("expert scales"), and an expert-layer's size includes its own."""
    shared = {"2-bit GPTQ codes": 0, "GPTQ group scale+zero": 0, EMBEDDING[a.embedding]: 0,
              "norms, biases, routers (float32)": 0, "expert scales, all experts (float32)": 0}
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
    """Bytes of the batch-1 decode cache (PDR states, GQA KV rings, positions)."""
    out = {"PDR states": 0, "GQA KV ring caches": 0, "positions": 0}
    tree = jax.eval_shape(lambda: init_cache(cfg, 1))
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key, n = jax.tree_util.keystr(path), math.prod(leaf.shape)
        floating = jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating)
        size = ITEMSIZE[a.state_dtype] if floating and a.state_dtype != "config" \
            else leaf.dtype.itemsize
        item = ("PDR states" if "'state'" in key else
                "GQA KV ring caches" if ("'k'" in key or "'v'" in key) else "positions")
        out[item] += n * size
    return out


def budget(a) -> dict:
    pc = load_config(a.config, a.overrides)
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
        "speed": speed, "flags": {k: v for k, v in vars(a).items() if k != "json"},
    }


def _num(x):
    return f"{x:,.1f}" if abs(x) >= 100 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3g}"


def _mib(n):
    return _num(n / MIB)


_verdict = ("FAIL", "PASS").__getitem__


def render(r) -> str:
    s, xl, p = r["speed"], r["expert_layer"], r["params"]
    fl = r["flags"]
    out = [f"# Budget: {r['config']}" + (" (counted as routed)" if r["routed_forced"] else ""),
           "",
           f"Census: {census.human(p['total_params'])} parameters, "
           f"{census.human(p['shared_params'])} shared, "
           f"{census.human(p['expert_params'])} in experts, "
           f"{census.human(p['active_params_per_token'])} active per token. "
           f"{r['expert_layers']} expert layers × {r['experts']} experts on a "
           f"{'×'.join(map(str, r['lattice']))} torus ({r['neighbour_pairs']} neighbour pairs "
           f"per layer).",
           "",
           f"One expert-layer: {xl['matrices']} matrices, {xl['trits'] / 1e6:.2f}M trits = "
           f"{_num(xl['bytes_2bit'] / MB)} MB as 2-bit codes ({_mib(xl['bytes_2bit'])} MiB), "
           f"{_num(xl['bytes_base3'] / MB)} MB as base-3 ({_mib(xl['bytes_base3'])} MiB), "
           "its float32 expert scales included.", ""]

    def table(title, items, total, unit_mib=True):
        fmt = _mib if unit_mib else (lambda n: _num(n / GB))
        rows = [f"## {title}", "", f"| item | {'MiB' if unit_mib else 'GB'} |", "|---|---:|"]
        rows += [f"| {k} | {fmt(v)} |" for k, v in items.items()]
        return rows + [f"| **total** | **{fmt(total)}** |", ""]

    out += table("Device memory", r["device"], r["device_total"])
    for label, cap in (("envelope", r["device_budget"]), ("design target", r["device_target"])):
        out.append(f"- device {label} {_mib(cap)} MiB: {_verdict(r['device_total'] <= cap)}, "
                   f"headroom {_mib(cap - r['device_total'])} MiB")
    out += [""] + table("Host memory (RAM)", r["host"], r["host_total"])
    out.append(f"- host expert cache holds {r['host_cache_expert_layers']:,} expert-layers = "
               f"{100 * r['host_cache_share']:.1f}% of all {r['expert_layers'] * r['experts']:,}")
    for label, cap in (("envelope", r["ram_budget"]), ("design target", r["ram_target"])):
        out.append(f"- RAM {label} {_mib(cap)} MiB: {_verdict(r['host_total'] <= cap)}, "
                   f"headroom {_mib(cap - r['host_total'])} MiB")
    out += [""] + table("Disk", r["disk"], r["disk_total"], unit_mib=False)
    out.append("(total excludes the alternative-format row)")
    rd = s["device_bytes_read_per_token"]
    out += ["", "## Projected decode speed (batch 1)", "", "| quantity | value |", "|---|---:|",
            f"| active FLOPs per token | {s['flops_per_token'] / 1e9:.2f} G "
            f"→ {s['compute_ms_flops']:.2f} ms at {fl['device_tflops']:g} TFLOPS |",
            *[f"| device reads per token: {k} | {v / MB:,.1f} MB |" for k, v in rd.items()],
            f"| device memory time per token | {s['compute_ms_memory']:.2f} ms at "
            f"{fl['device_gbs']:g} GB/s |",
            f"| compute per token / per expert layer | {s['compute_ms_per_token']:.2f} ms / "
            f"{s['compute_ms_per_expert_layer']:.3f} ms |",
            f"| one full expert-layer over PCIe ({fl['wire_format']}) | "
            f"{s['full_load_pcie_ms']:.2f} ms at {fl['pcie_gbs']:g} GB/s |",
            f"| same in base-3 (SPEC §3.5's 27.05 MB format) | {s['base3_pcie_ms']:.2f} ms |",
            f"| one full expert-layer from disk | {s['full_load_disk_ms']:.2f} ms at "
            f"{fl['disk_gbs']:g} GB/s |",
            f"| shares same / neighbour / full, delta share | {fl['same']:g} / "
            f"{fl['neighbour']:g} / {fl['full']:g}, {fl['delta_share']:g} |",
            f"| host-cache hit rate | {s['hit_rate']:.3f}"
            + (" (uniform routing)" if fl["hit_rate"] is None else "") + " |",
            f"| expected time per expert layer | {s['ms_per_expert_layer']:.3f} ms |",
            f"| **projected decode** | **{s['tok_s']:.2f} tok/s**, bound by {s['bound']}; "
            f"{100 * s['transfer_stall_share']:.0f}% of the time waits on transfers |",
            f"| compute only (every layer 'same') | {s['tok_s_compute_only']:.2f} tok/s |",
            f"| every layer a full load, all cached / all from disk | "
            f"{s['tok_s_all_full_cached']:.2f} / {s['tok_s_all_full_from_disk']:.2f} tok/s |", ""]
    need = s["hit_rate_needed_for_gate"]
    out += [f"- decode gate ≥ {s['gate_tok_s']:g} tok/s (SPEC §5): {_verdict(s['meets_gate'])}",
            f"- to meet it with same:neighbour kept at {fl['same']:g}:{fl['neighbour']:g}, the "
            f"full-load share must be ≤ {s['max_full_share_for_gate_at_hit_rate']:.3f} at hit "
            f"rate {s['hit_rate']:.3f}, ≤ {s['max_full_share_for_gate_all_cached']:.3f} if "
            "every load hits the host cache",
            "- at the given shares the gate needs a host-cache hit rate of "
            + (f"≥ {need:.3f}" if need is not None else "> 1 (unreachable)"), "",
            f"**{_verdict(r['fits_envelope'])}: fits the {_mib(r['device_budget'])} MiB device / "
            f"{_mib(r['ram_budget'])} MiB RAM envelope** (headroom "
            f"{_mib(r['device_budget'] - r['device_total'])} MiB device, "
            f"{_mib(r['ram_budget'] - r['host_total'])} MiB RAM); design targets "
            f"{_mib(r['device_target'])} / {_mib(r['ram_target'])} MiB: "
            f"{_verdict(r['fits_targets'])}"]
    return "\n".join(out)


@cli_entry
def main(argv=None) -> int:
    a = parse_args(argv)
    r = budget(a)
    print(json.dumps(r, indent=2) if a.json else render(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
