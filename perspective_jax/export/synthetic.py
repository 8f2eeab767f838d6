"""Synthetic model directories for streaming benchmarks (no training, any size).

    write_synthetic_model_dir(out, cfg, seed=0, neighbour_flip_share=None,
                              coherent_routers=True, shared_bits=0, group_size=64)

With `shared_bits` the shared matrices are written as round-to-nearest group
codes in the `--shared-bits` export format (`rtn_quantized_tensors`; no
calibration text, so no GPTQ error compensation).

Experts are random ternary regions (drawn from the 81 valid 4-trit codes, so
every byte is a legal code). With `neighbour_flip_share` s, expert e of each
layer is its lattice predecessor with a share s of bytes redrawn, so lattice
neighbours differ little and deltas pay off. Shared weights are random with
fan-in scaling and experts scaled by `expert_gain`/√fan-in (small, so the
residual stream drifts slowly across layers). With `coherent_routers` every
layer uses the same router projection, otherwise each layer draws its own
(measured: the router predictor is right ~60 % of the time either way — it
applies layer j+1's own router, so what matters is the drift of the hidden
state, not whether routers are shared).
Nothing of the size of the expert store is ever held in memory: one layer's
regions at a time.
"""

from __future__ import annotations

import itertools
import os
import shutil

import jax
import numpy as np
from safetensors.numpy import save_file

from perspective_jax.config import PerspectiveConfig, to_dict
from perspective_jax.config.param_layout import expert_layers, routed_ffns
from perspective_jax.quant import embedding_int8
from perspective_jax.quant import gptq
from perspective_jax.modeldir import format as md
from perspective_jax.modeldir import publish
from perspective_jax.export.exporter import flatten_params
from perspective_jax.export.experts import write_expert_files
from perspective_jax.model.cache_io import unflatten_paths
from perspective_jax.model.transformer import abstract_params
from perspective_jax.moe import torus

# every byte whose four 2-bit fields are codes 0, 1 or 2 (trits −1, 0, +1)
VALID_BYTES = np.asarray([a | b << 2 | c << 4 | d << 6
                          for a, b, c, d in itertools.product(range(3), repeat=4)], np.uint8)


def _shared_params(cfg: PerspectiveConfig, rng: np.random.Generator) -> dict:
    """Random non-expert parameters of the right shapes (norm scales 1, decay bias ~0.9)."""
    shapes = abstract_params(cfg.model, cfg.moe)
    # torus coordinates z = h·W mod 1 vary smoothly when h·W spans about one cell
    d = cfg.model.d_model
    router = rng.normal(0, 1 / np.sqrt(d), (d, 3)).astype(np.float32)

    def fill(path, leaf):
        names = [str(getattr(k, "key", k)) for k in path]
        if names[-1] in md.EXPERT_MATRICES and names[-2] == "ffn":
            return None
        if names[-1] == "scale":
            return np.ones(leaf.shape, np.float32)
        if names[-1] == "b_p":
            return np.full(leaf.shape, 2.2, np.float32)          # decay ≈ 0.9
        if names[-1] == "w_route":
            return np.broadcast_to(router, leaf.shape).copy()
        if names[-1] in ("offsets", "log_temperature"):
            return np.zeros(leaf.shape, np.float32)
        fan_in = leaf.shape[-2] if len(leaf.shape) >= 2 else 1
        return (rng.normal(0, 0.2 / np.sqrt(fan_in), leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)   # expert leaves → None (dropped)


def write_synthetic_model_dir(out: str, cfg: PerspectiveConfig, seed: int = 0,
                              neighbour_flip_share=None, coherent_routers: bool = True,
                              expert_gain: float = 0.05, force: bool = False,
                              shared_bits: int = 0, group_size: int = 64,
                              embedding: str = "float32", log=print) -> dict:
    if embedding not in embedding_int8.FORMATS:
        raise ValueError(f"embedding must be one of {embedding_int8.FORMATS}, got {embedding!r}")
    if not (cfg.model.routed and cfg.ternary.enabled):
        raise ValueError("a synthetic streaming model needs model.routed and ternary.enabled")
    publish.check_destination(out, force)
    tmp = publish.staging_dir(out)
    try:
        manifest = _write_into(tmp, cfg, seed, neighbour_flip_share, coherent_routers,
                               expert_gain, shared_bits, group_size, embedding, log)
        publish.publish(tmp, out, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _write_into(tmp, cfg, seed, neighbour_flip_share, coherent_routers, expert_gain,
                shared_bits, group_size, embedding, log) -> dict:
    rng = np.random.default_rng(seed)
    layout = md.RegionLayout(cfg.model.d_model, cfg.model.d_ff)
    layers = expert_layers(cfg.model)
    e = cfg.moe.num_experts
    order = _lattice_walk(cfg.moe.lattice)

    def layer_regions(j):
        regions = [None] * e
        for x, parent in order:
            if neighbour_flip_share is None or parent is None:
                regions[x] = VALID_BYTES[rng.integers(0, 81, layout.nbytes, dtype=np.uint8)]
            else:
                region = regions[parent].copy()
                flip = rng.random(layout.nbytes) < neighbour_flip_share
                region[flip] = VALID_BYTES[rng.integers(0, 81, int(flip.sum()), dtype=np.uint8)]
                regions[x] = region
        return regions

    index = write_expert_files(tmp, layout, len(layers), cfg.moe.lattice, layer_regions,
                               delta_max_share=0.5, log=log)
    params = _shared_params(cfg, rng)
    if not coherent_routers:
        for _, ffn in routed_ffns(params, cfg.model):
            router = ffn["router"]
            router["w_route"] = rng.normal(0, 1 / np.sqrt(cfg.model.d_model),
                                           router["w_route"].shape).astype(np.float32)
    tensors = flatten_params(params)
    if embedding == "int8":
        embedding_int8.quantize_in_place(tensors)
    quantized = []
    if shared_bits:
        tensors, quantized = rtn_quantized_tensors(cfg, tensors, shared_bits, group_size)
    d, f = cfg.model.d_model, cfg.model.d_ff
    for name, fan_in in zip(md.EXPERT_MATRICES, (d, d, f)):
        tensors[md.scale_key(name)] = np.full((len(layers), e, 1), expert_gain / np.sqrt(fan_in),
                                              np.float32)
    save_file(tensors, os.path.join(tmp, md.SHARED_FILE))
    with open(os.path.join(tmp, "tokenizer.byte"), "w") as fh:
        fh.write("utf-8 bytes\n")
    shared = {"file": md.SHARED_FILE, "bits": shared_bits,
              "group_size": group_size if shared_bits else 0, "quantized": quantized,
              "embedding": embedding,
              "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)}
                          for k, v in tensors.items()}}
    return md.write_manifest(tmp, to_dict(cfg), f"synthetic(seed={seed})", shared, index,
                             np.full((len(layers), e), 1.0 / e))


def rtn_quantized_tensors(cfg: PerspectiveConfig, tensors: dict, bits: int,
                          group_size: int) -> tuple[dict, list]:
    """Flat shared tensors with every shared kernel ('periods/layer_i/…/kernel' [P, …])
    replaced by per-period round-to-nearest group codes (the GPTQ export's format,
    without calibration); returns (tensors, the manifest's "quantized" list)."""
    from perspective_jax.export.calibrate import rtn_quantize_shared, shared_kernel_widths
    widths = shared_kernel_widths(cfg.model, cfg.moe)
    kernels = {f"periods/{name}" for name in widths}
    stacked = unflatten_paths({k: tensors[k] for k in kernels})
    qt = rtn_quantize_shared(stacked, widths, cfg.model.n_periods, bits, group_size)
    out = {k: v for k, v in tensors.items() if k not in kernels}
    out.update(qt)
    return out, [{"path": p, "method": "rtn"} for p in sorted(gptq.read_kernels(qt))]


def _lattice_walk(lattice) -> list[tuple[int, object]]:
    """(expert, lattice-neighbour parent) in breadth-first order from expert 0."""
    adj = torus.lattice_neighbours(tuple(lattice))
    seen, order, frontier = {0}, [(0, None)], [0]
    while frontier:
        nxt = []
        for a in frontier:
            for b in adj[a]:
                if b not in seen:
                    seen.add(b)
                    order.append((b, a))
                    nxt.append(b)
        frontier = nxt
    return order
