"""`perspective-budget`: device / RAM / disk envelope and projected decode speed of a
config, item by item (SPEC §3.5, §5; computed by `perspective_jax.infer.envelope`);
with --train, the per-device memory and step time of training it on a mesh
(`perspective_jax.train.plan`).

    perspective-budget --config curricula/perspective-1t.yaml \
        --device-mb 4096 --ram-mb 32768 --pcie-gbs 7 --disk-gbs 6 [--json] \
        [--same 0.3 --neighbour 0.4 --full 0.3] [--hit-rate H] [--delta-share 0.1] ...
    perspective-budget --train --devices 1024 --device-mem-gb 80 [--stage sparse] \
        [--mfu 0.4] [--peak-tflops 989] [mesh.fsdp=8 mesh.tensor=4 ...] [--json]

Tables in Markdown, or one JSON object with --json (docs/budget.md).
"""

from __future__ import annotations

import json
import os

from perspective_jax.cli.common import (OneLineParser, cli_entry, exit_with, float_in, int_in,
                                        megabytes, share)
from perspective_jax.config import load_config
from perspective_jax.errors import UserError
from perspective_jax.infer.envelope import (EMBEDDING, GB, ITEMSIZE, MB, MIB, WIRE_FORMATS,
                                            Assumptions, envelope)
from perspective_jax.train.plan import GIB
from perspective_jax.model import census
from perspective_jax.train import plan

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULTS = Assumptions()
rate = float_in(0.0, 1e6, open_low=True)   # GB/s or TFLOPS
TRAIN_DEFAULTS = plan.Hardware()
TRAIN_FLAGS = {"devices": 1024, "device_mem_gb": TRAIN_DEFAULTS.device_gib,
               "mem_fraction": TRAIN_DEFAULTS.mem_fraction, "mfu": TRAIN_DEFAULTS.mfu,
               "peak_tflops": TRAIN_DEFAULTS.peak_tflops, "stage": "sparse",
               "optimizer_state": "sharded"}


def parse_args(argv):
    p = OneLineParser(prog="perspective-budget", description=__doc__.splitlines()[0])
    f = p.add_argument
    f("--config", default=os.path.join(REPO, "curricula", "perspective-1t.yaml"))
    f("overrides", nargs="*", metavar="section.key=value")
    f("--json", action="store_true", help="print one JSON object instead of tables")
    for name, kind in (("device-mb", megabytes), ("ram-mb", megabytes), ("pcie-gbs", rate),
                       ("disk-gbs", rate), ("same", share), ("neighbour", share),
                       ("full", share)):
        f("--" + name, type=kind, default=getattr(DEFAULTS, name.replace("-", "_")))
    f("--device-target-mb", type=megabytes, default=DEFAULTS.device_target_mb,
      help="SPEC design target")
    f("--ram-target-mb", type=megabytes, default=DEFAULTS.ram_target_mb,
      help="SPEC design target; the host cache fills RAM up to min(this, --ram-mb)")
    f("--device-reserve-mb", type=megabytes, default=DEFAULTS.device_reserve_mb,
      help="CUDA context + cuBLAS/XLA workspaces + allocator slack (typ. 300-500 MiB)")
    f("--host-reserve-mb", type=megabytes, default=DEFAULTS.host_reserve_mb,
      help="Python + JAX/XLA + CUDA driver host side of the inference process")
    f("--host-cache-mb", type=megabytes, default=DEFAULTS.host_cache_mb,
      help="cap on the host expert cache")
    f("--group-size", type=int_in(1), default=DEFAULTS.group_size,
      help="GPTQ rows per scale+zero group")
    f("--group-bytes", type=int_in(1), default=DEFAULTS.group_bytes, help="bytes of one group's "
      "scale + zero per output column: 4 = fp16 + fp16, 8 = float32 + float32")
    f("--embedding", default=DEFAULTS.embedding, choices=list(EMBEDDING),
      help="embedding/head format on the device: int8 with one float32 scale per row is "
      "what perspective-export --shared-bits writes (SPEC §3.4); float32 is "
      "--embedding float32")
    f("--state-dtype", default=DEFAULTS.state_dtype, choices=[*ITEMSIZE, "config"])
    f("--workspace-factor", type=float_in(0.0, 1e3), default=DEFAULTS.workspace_factor,
      help="multiplier on the live activation vectors for XLA temporaries")
    f("--wire-format", default=DEFAULTS.wire_format, choices=list(WIRE_FORMATS),
      help="expert format on disk, in the host cache and over PCIe: 2bit is what "
      "perspective-export writes; base3 (5 trits/byte, SPEC §3.4) is a what-if "
      "projection only, no exporter or engine reads it")
    f("--region-align", type=int_in(1, 2**30), default=DEFAULTS.region_align,
      help="expert-region alignment on disk")
    f("--delta-share", type=share, default=DEFAULTS.delta_share,
      help="mean delta / full expert-layer")
    f("--hit-rate", type=share, default=DEFAULTS.hit_rate,
      help="host-cache hit rate of loads")
    f("--device-tflops", type=rate, default=DEFAULTS.device_tflops,
      help="RTX 3050 Laptop 4 GB class: 2048 CUDA cores x 2 x ~1.7 GHz")
    f("--device-gbs", type=rate, default=DEFAULTS.device_gbs,
      help="RTX 3050 Laptop 4 GB class: 128-bit GDDR6 at 12 Gbps")
    f("--train", action="store_true", help="the training plan: per-device memory and step "
      "time of the config's train step on a mesh (mesh.* overrides, docs/budget.md)")
    f("--devices", type=int_in(1), help="--train: devices of the mesh (default 1024)")
    f("--device-mem-gb", type=rate, help="--train: memory of one device in GiB (default 80)")
    f("--mem-fraction", type=float_in(0.0, 1.0, open_low=True),
      help="--train: share of it XLA may use (XLA_PYTHON_CLIENT_MEM_FRACTION; default 0.9)")
    f("--mfu", type=float_in(0.0, 1.0, open_low=True),
      help="--train: model-FLOPs utilisation of the step-time estimate (default 0.4)")
    f("--peak-tflops", type=rate, help="--train: peak dense TFLOPS of one device in the "
      "compute dtype (default 989: H100 SXM, bfloat16)")
    f("--stage", choices=list(plan.STAGES), help="--train: the curriculum stage whose step "
      "is planned (default sparse: routed experts)")
    f("--optimizer-state", choices=list(plan.OPTIMIZER_LAYOUTS), help="--train: AdamW's "
      "moments sharded like their parameter (default) or whole on every device")
    a = p.parse_args(argv)
    given = [k for k in TRAIN_FLAGS if getattr(a, k) is not None]
    if not a.train:
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} applies to --train only")
    else:
        for k, v in TRAIN_FLAGS.items():
            if getattr(a, k) is None:
                setattr(a, k, v)
        return a
    total = a.same + a.neighbour + a.full
    if abs(total - 1.0) > 1e-6:
        raise UserError(f"--same + --neighbour + --full must sum to 1, got "
                        f"{a.same:g} + {a.neighbour:g} + {a.full:g} = {total:g}")
    return a


def assumptions(a) -> Assumptions:
    """The parsed flags as the computation's `Assumptions`."""
    return Assumptions(**{f: getattr(a, f) for f in Assumptions.__dataclass_fields__})


def report(a) -> dict:
    """What --json prints: the envelope (or with --train the training plan), with the
    config path and overrides first among the flags."""
    if a.train:
        from perspective_jax.train.stages import stage_config
        hw = plan.Hardware(device_gib=a.device_mem_gb, mem_fraction=a.mem_fraction,
                           peak_tflops=a.peak_tflops, mfu=a.mfu)
        cfg = stage_config(load_config(a.config, a.overrides), a.stage)
        r = plan.train_plan(cfg, a.devices, hw, a.optimizer_state)
        r["flags"] = {"config": a.config, "overrides": a.overrides, "stage": a.stage,
                      "devices": a.devices, **r.pop("hardware")}
        return r
    r = envelope(load_config(a.config, a.overrides), assumptions(a))
    r["flags"] = {"config": a.config, "overrides": a.overrides, **r["flags"]}
    return r


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


def _gib(n):
    return _num(n / GIB)


def render_train(r) -> str:
    """The training plan as Markdown (docs/budget.md, "The 1.05T training plan")."""
    b, m, t, fl, lay = r["batch"], r["model"], r["time"], r["flags"], r["layout"]["params"]
    mesh = " × ".join(f"{k} {v}" for k, v in r["mesh"].items())
    out = [f"# Training plan: {r['config']}, stage {fl['stage']}, on {r['n_devices']:,} "
           f"devices of {fl['device_gib']:g} GiB", "",
           f"Mesh {mesh} (mesh.* of the config for {r['n_devices']:,} devices). "
           f"{census.human(m['total_params'])} parameters in {m['param_dtype']}, "
           f"{census.human(m['active_params_per_token'])} active per token; compute in "
           f"{m['dtype']}, remat {m['remat']}, {m['n_periods']} periods.",
           "",
           f"Batch {b['batch_size']:,} × {b['seq_len']:,} tokens, grad_accum "
           f"{b['grad_accum']}: {b['sequences_per_device']:,} sequences = "
           f"{b['tokens_per_device']:,} tokens per device and micro-batch (split over data × "
           f"fsdp × expert = {b['batch_shards']:,} shards; the tensor axis shares them).",
           "",
           f"Parameters sharded by the trainer's rules (train/sharding.py): {lay['leaves']} "
           f"leaves, {lay['replicated_leaves']} of them whole on every device "
           f"({census.human_bytes(lay['replicated_bytes'])}: no rule, or a dimension the "
           f"mesh does not divide). Optimizer state: {r['optimizer_layout']}. The plan "
           "assumes every layer keeps the batch split over its shards, routed tokens "
           "included (expert-parallel dispatch); docs/budget.md compares it with the "
           "compiled step.", "",
           "## Per-device memory", "", "| item | GiB |", "|---|---:|"]
    items = {**r["state"], **r["step"]}
    out += [f"| {k} | {_gib(v)} |" for k, v in items.items()]
    out += [f"| **total** | **{_gib(r['total'])}** |", ""]
    cap, fits = r["usable_bytes"], r["fits"]
    largest = max(items, key=items.get)
    out.append(f"- {fl['device_gib']:g} GiB × {fl['mem_fraction']:g} usable by XLA = "
               f"{_gib(cap)} GiB: {_verdict(fits)}, headroom {_gib(cap - r['total'])} GiB"
               + ("" if fits else f"; the largest item is {largest}"))
    out += ["", "## Step time", "", "| quantity | value |", "|---|---:|",
            f"| training FLOPs per token (3 × forward: 6·N_active + PDR + attention) | "
            f"{t['flops_per_token'] / 1e9:,.1f} G |",
            f"| tokens per step | {t['tokens_per_step']:,} |",
            f"| model FLOPs per step | {t['model_flops']:.3g} |",
            f"| hardware FLOPs per step (remat {m['remat']}) | {t['hardware_flops']:.3g} |",
            f"| model FLOPs per device | {t['model_flops_per_device']:.3g} |",
            f"| **step time** at MFU {fl['mfu']:g} of {fl['peak_tflops']:g} TFLOPS × "
            f"{r['n_devices']:,} devices | **{t['step_s']:.3f} s** |",
            f"| tokens per second | {t['tokens_per_s']:,.0f} |",
            f"| train.steps at that rate | {t['train_hours']:,.1f} h |"]
    return "\n".join(out)


@cli_entry
def run(argv=None) -> int:
    a = parse_args(argv)
    r = report(a)
    print(json.dumps(r, indent=2) if a.json else render_train(r) if a.train else render(r))
    return 0


main = exit_with(run)

if __name__ == "__main__":
    main()
