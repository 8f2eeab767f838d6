"""Disk space of an export: what it will write, checked against what is free up front.

    needed = expected_bytes(cfg, params, shared_bits, embedding)   # shapes suffice
    check_free_space(out_dir, needed)         # UserError with both numbers, or nothing

The estimate counts what every export writes: each expert region and each expert
layer's hub region (padded to `REGION_ALIGN`), the expert scales and the shared
weights as stored (float32; a quantised kernel `bits`/32 of that; an int8 embedding
one byte per weight plus a float32 row scale). Neighbour and hub deltas (each at
most `--delta-max-share` of the region it replaces, often far less), the tokenizer,
the safetensors header and the manifest come on top, so the check refuses only
exports that cannot fit.
"""

from __future__ import annotations

import math

import jax

from perspective_jax.config import PerspectiveConfig
from perspective_jax.config.param_layout import expert_layers, map_routed_ffns
from perspective_jax.errors import UserError
from perspective_jax.fileio import free_bytes, human_bytes
from perspective_jax.modeldir import format as md
from perspective_jax.quant import embedding_int8

SKIP_FLAG = "--skip-space-check"


def expected_bytes(cfg: PerspectiveConfig, params, shared_bits: int = 0,
                   embedding: str = "float32") -> int:
    """Bytes the export of `params` (arrays or shape/dtype structs) writes at least."""
    total, shared = 0, params
    if cfg.model.routed:
        layout = md.RegionLayout(cfg.model.d_model, cfg.model.d_ff)
        layers = len(expert_layers(cfg.model))
        n = layers * cfg.moe.num_experts
        per_row = cfg.ternary.scale_granularity == "row"
        scales = 2 * cfg.model.d_ff + cfg.model.d_model if per_row else 3
        total += n * (layout.stride + 4 * scales) + layers * layout.stride   # + the hubs
        shared = map_routed_ffns(params, cfg.model, lambda _, ffn: {
            k: v for k, v in ffn.items() if k not in md.EXPERT_MATRICES})
    for path, leaf in jax.tree_util.tree_flatten_with_path(shared)[0]:
        shape = tuple(int(d) for d in leaf.shape)
        size = math.prod(shape)
        if "/".join(str(getattr(p, "key", p)) for p in path) == embedding_int8.EMBED_KEY:
            total += size + 4 * shape[0] if embedding == "int8" else 4 * size
        elif shared_bits and len(shape) >= 2:
            total += size * shared_bits // 8
        else:
            total += 4 * size
    return total


def check_free_space(out_dir: str, needed: int) -> None:
    """Refuse an export that cannot fit on the filesystem of `out_dir`."""
    free = free_bytes(out_dir)
    if free is not None and free < needed:
        raise UserError(f"--out {out_dir}: the export needs at least {human_bytes(needed)}, "
                        f"its filesystem has {human_bytes(free)} free; free some space, "
                        f"choose another --out, or pass {SKIP_FLAG} to try anyway")
