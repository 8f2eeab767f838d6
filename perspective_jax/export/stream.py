"""Write a model directory one period at a time (SPEC §3.5), from any parameter source.

    manifest = export_into(out, run, cfg, source, calib, options, template, log, polytope)

`source` (`export.sources`) gives whole leaves and one period's parameters at a
time; nothing else of the model is held:

1. the leaves outside the periods (embedding, final norm) are written to
   shared.safetensors; the embedding (int8 with a row scale, or float32) becomes the
   calibration inputs and the polytope's head, then is dropped;
2. for each period p: its expert layers are ternarised, packed and written
   (`export.experts`), their matrices replaced by the exact ternary values; its
   other leaves are written as slice p of their stacked tensors; with
   `--shared-bits` its shared kernels' Hessians are accumulated over the calibration
   text and GPTQ-quantised (`export.calibrate`); its routers count the calibration
   tokens (`export.routing`); the activations move on to period p + 1;
3. the tokenizer, chat template and, last, the manifest.

shared.safetensors is laid out up front from the tensors' shapes
(`export.tensor_file`), so every piece goes to its place as it is made. The
manifest lists the tensors in the order of a whole-model export: the flattened
shared parameters (the int8 embedding in place, its row scales after them), the
quantised kernels by path, then the expert scales.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os

import jax
import numpy as np

from perspective_jax.config import PerspectiveConfig, to_dict
from perspective_jax.config.param_layout import expert_layers, routed_positions
from perspective_jax.data.tokenizer import copy_tokenizer
from perspective_jax.errors import UserError
from perspective_jax.export.calibrate import (HessianPass, kernel_specs, quantize_kernels,
                                              shared_kernel_widths)
from perspective_jax.export.experts import ExpertWriter, ternary_layer
from perspective_jax.export.polytope import write_model_polytope
from perspective_jax.export.routing import RoutingPass
from perspective_jax.export.sources import PERIODS, at_path, leaf_paths
from perspective_jax.export.tensor_file import TensorFile
from perspective_jax.fileio import naming
from perspective_jax.modeldir import format as md
from perspective_jax.modeldir.chat_template import write_chat_template
from perspective_jax.quant import embedding_int8
from perspective_jax.quant.embedding_int8 import EMBED_KEY, SCALE_KEY

F32 = np.dtype(np.float32)
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)   # glibc


def release_freed_memory() -> None:
    """Hand the heap pages freed so far back to the OS: glibc keeps them otherwise, and
    a streamed export's RSS would creep period by period above its working set."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """The export's choices (checked by `exporter._check_args`)."""
    shared_bits: int = 0
    group_size: int = 64
    delta_max_share: float = 0.5
    embedding: str = "float32"


@dataclasses.dataclass
class SharedPlan:
    """What shared.safetensors holds: {key: (dtype, shape)} in manifest order, and
    which leaves are written whole and which one period at a time as they are (the
    rest: GPTQ codes and expert scales, made by the export)."""
    specs: dict
    whole: list            # keys outside the periods
    per_period: list       # paths within a period of the stacked leaves written as is


def shared_plan(cfg: PerspectiveConfig, like, opts: ExportOptions) -> SharedPlan:
    """The plan of shared.safetensors for parameters shaped like `like`."""
    m = cfg.model
    experts = set()
    if m.routed:
        experts = {f"{PERIODS}/layer_{i}/ffn/{n}" for i in routed_positions(m)
                   for n in md.EXPERT_MATRICES}
    flat = [(k, leaf) for k, leaf in zip(leaf_paths(like), jax.tree.leaves(like))
            if k not in experts]
    specs = {k: (np.dtype(leaf.dtype), tuple(leaf.shape)) for k, leaf in flat}
    whole = [k for k, _ in flat if not k.startswith(PERIODS + "/")]
    if opts.embedding == "int8":
        v, d = specs[EMBED_KEY][1]
        specs[EMBED_KEY], specs[SCALE_KEY] = (np.dtype(np.int8), (v, d)), (F32, (v,))
    widths = shared_kernel_widths(m, cfg.moe) if opts.shared_bits else {}
    quantized = {}
    for path in sorted(f"{PERIODS}/{p}/{name}" for p in range(m.n_periods) for name in widths):
        name = path.split("/", 2)[2]
        specs.pop(f"{PERIODS}/{name}", None)
        quantized.update(kernel_specs(path, at_path(like, f"{PERIODS}/{name}").shape[1:],
                                      widths[name], opts.shared_bits, opts.group_size))
    specs.update(quantized)
    if m.routed:
        n_layers, e = len(expert_layers(m)), cfg.moe.num_experts
        ffn = at_path(like, f"{PERIODS}/layer_{routed_positions(m)[0]}/ffn")
        for n in md.EXPERT_MATRICES:
            s = 1 if cfg.ternary.scale_granularity == "tensor" else ffn[n].shape[-1]
            specs[md.scale_key(n)] = (F32, (n_layers, e, s))
    per_period = [k[len(PERIODS) + 1:] for k, _ in flat if k.startswith(PERIODS + "/")
                  and k[len(PERIODS) + 1:] not in widths]
    return SharedPlan(specs, whole, per_period)


def export_into(out: str, run: str, cfg: PerspectiveConfig, source, calib,
                opts: ExportOptions, template, log=print, polytope=None) -> dict:
    """Write the model directory's files into `out` (an empty staging directory) from
    `source`; returns the manifest (written last)."""
    m = cfg.model
    if opts.shared_bits and calib is None:
        raise UserError("--shared-bits needs calibration text: the run has no token "
                        "store; pass --calibration-text FILE")
    plan = shared_plan(cfg, source.like, opts)
    tensors = TensorFile(os.path.join(out, md.SHARED_FILE), plan.specs)
    embed = _write_whole(tensors, plan, source, opts.embedding)
    hessians = (HessianPass(m, cfg.moe, {"embed": embed}, calib)
                if opts.shared_bits else None)
    routing = RoutingPass(cfg, calib) if m.routed else None
    if routing is not None:
        routing.start({"embed": embed})
    safety_entry = (None if polytope is None else
                    write_model_polytope(out, polytope, embed["embedding"]))
    del embed
    like = _period_like(cfg, source.like)
    for calibration in (hessians, routing):   # compiled before any weights are held
        if calibration is not None:
            calibration.compile(like)
    release_freed_memory()                    # the compilers' scratch
    experts = index = None
    if m.routed:
        experts, index = ExpertWriter(out, md.RegionLayout(m.d_model, m.d_ff),
                                      cfg.moe.lattice, opts.delta_max_share), []
    quantized = []
    for p in range(m.n_periods):
        period = source.period(p)
        if experts is not None:
            index += _write_experts(p, period, cfg, experts, tensors)
        for path in plan.per_period:
            tensors.write(f"{PERIODS}/{path}", at_path(period, path), at=(p,))
        period = _on_device(period)   # once, not per call; each host leaf dropped as moved
        if hessians is not None:
            qt, report = quantize_kernels(lambda path: at_path(period, path.split("/", 2)[2]),
                                          hessians.period(p, period), opts.shared_bits,
                                          opts.group_size)
            for key, value in qt.items():
                tensors.write(key, value)
            quantized += [{"path": path, "rel_error": float(err_gptq),
                           "rel_error_rtn": float(err_rtn)} for path, err_gptq, err_rtn in report]
        if routing is not None:
            routing.period(p, period)
        del period
        release_freed_memory()
    tensors.close()
    if experts is not None:
        experts.summary(log)
    if opts.shared_bits:
        log(f"shared kernels quantised to {opts.shared_bits} bits (GPTQ, group "
            f"{opts.group_size}): {len(quantized)} tensors")
    with naming(out):
        copy_tokenizer(run, out)
    template_entry = write_chat_template(out, *template)
    shared_meta = {"file": md.SHARED_FILE, "bits": opts.shared_bits,
                   "group_size": opts.group_size,
                   "quantized": sorted(quantized, key=lambda q: q["path"]),
                   "embedding": opts.embedding,
                   "tensors": {k: {"shape": list(s), "dtype": str(d)}
                               for k, (d, s) in plan.specs.items()}}
    freqs = routing.frequencies() if routing is not None else None
    return md.write_manifest(out, to_dict(cfg), os.path.basename(os.path.abspath(run)),
                             shared_meta, index or [], freqs, template_entry, safety_entry)


def _period_like(cfg: PerspectiveConfig, like) -> dict:
    """ShapeDtypeStructs of one period as the passes see it: the experts float32."""
    experts = {f"layer_{i}/ffn/{n}" for i in routed_positions(cfg.model)
               for n in md.EXPERT_MATRICES} if cfg.model.routed else set()
    return jax.tree_util.tree_map_with_path(lambda path, a: jax.ShapeDtypeStruct(
        a.shape[1:], F32 if "/".join(k.key for k in path) in experts else a.dtype),
        like[PERIODS])


def _on_device(tree: dict) -> dict:
    """The period's arrays moved into JAX buffers leaf by leaf, each host array let go
    as soon as it is copied (the passes below read them many times)."""
    out = {}
    for key in list(tree):
        value = tree.pop(key)
        out[key] = _on_device(value) if isinstance(value, dict) else jax.device_put(value)
        del value
    return out


def _write_whole(tensors: TensorFile, plan: SharedPlan, source, embedding: str) -> dict:
    """Write the leaves outside the periods; returns {"embedding": the table the
    exported model computes with} (dequantised int8, or the float table)."""
    embed = None
    for key in plan.whole:
        value = source.leaf(key)
        if key == EMBED_KEY and embedding == "int8":
            codes, scale = embedding_int8.quantize(value)
            tensors.write(EMBED_KEY, codes)
            tensors.write(SCALE_KEY, scale)
            embed = {"embedding": embedding_int8.dequantize(codes, scale).astype(
                value.dtype, copy=False)}
        else:
            tensors.write(key, value)
            if key == EMBED_KEY:
                embed = {"embedding": value}
    return embed


def _write_experts(p: int, period: dict, cfg: PerspectiveConfig, experts: ExpertWriter,
                   tensors: TensorFile) -> list:
    """Ternarise, pack and write period p's expert layers; their matrices in `period`
    become the exact ternary values. Returns their manifest index entries."""
    positions = routed_positions(cfg.model)
    entries = []
    for n, i in enumerate(positions):
        j = p * len(positions) + n
        ffn = period[f"layer_{i}"]["ffn"]
        regions, scales = ternary_layer(ffn, cfg.ternary.scale_granularity, experts.layout)
        entries.append(experts.layer(j, regions))
        for name in md.EXPERT_MATRICES:
            tensors.write(md.scale_key(name), scales[name], at=(j,))
        del regions
    return entries
