"""The adapter file: LoRA adapters (and optionally adapted expert coordinates) tied
to the model they were trained on (SPEC §3.8).

    save_adapters("shakespeare.adapter", lora, identity, AdapterSpec(rank=4))
    lora, spec = load_adapters("shakespeare.adapter", identity, cfg)

Safetensors with the checksummed metadata of `model.cache_io.write_checked`
(format "perspective-adapter/1"): tensors `periods/layer_i/w_p/a` [P, d_in, r] and
`…/b` [P, r, d_out] (any targets), optional `coords/layer_i` [P, E, 3] (expert
positions of the routed layers, `adapt.coords`); metadata: the
model's identity (`modeldir.manifest.model_identity`), rank, targets, scale. A file
of another model, another shape, non-finite values, or any changed byte is a
one-line error naming it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

import jax
import numpy as np

from perspective_jax.adapt.coords import check_positions
from perspective_jax.config import PerspectiveConfig
from perspective_jax.errors import UserError
from perspective_jax.model.cache_io import (flatten_cache, read_checked, unflatten_paths,
                                            write_checked)
from perspective_jax.model.extensions import init_lora

FORMAT = "perspective-adapter/1"


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """LoRA rank, the PDR projections adapted, and the scale the adapters apply with."""

    rank: int = 4
    targets: tuple = ("w_p",)
    scale: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if not 1 <= self.rank <= 1024:
            raise UserError(f"adapter rank {self.rank}: must lie in 1..1024")
        if not self.targets:
            raise UserError("an adapter needs at least one target projection")


def save_adapters(path: str, adapters: dict, identity: str, spec: AdapterSpec,
                  coords: Optional[dict] = None) -> None:
    """Write `adapters` (init_lora's tree) and `coords` ({layer_i: [P, E, 3]}) atomically."""
    tensors = flatten_cache(adapters)
    for name, z in (coords or {}).items():
        tensors[f"coords/{name}"] = np.asarray(z, np.float32)
    meta = {"format": FORMAT, "model": identity, "rank": str(spec.rank),
            "targets": json.dumps(list(spec.targets)), "scale": repr(float(spec.scale))}
    write_checked({k: np.asarray(v, np.float32) for k, v in tensors.items()}, meta, path)


def load_adapters(path: str, identity: str, cfg: PerspectiveConfig
                  ) -> tuple[dict, AdapterSpec, dict]:
    """(adapters tree, its spec, coords {layer_i: [P, E, 3]}, {} when the file has
    none) of an adapter file made for the model `identity` with config `cfg`."""
    tensors, meta = read_checked(path, FORMAT, "an adapter file", (),
                                 "train the adapter again (perspective-adapt)")
    if meta.get("model") != identity:
        raise UserError(f"{path} was trained on another model; use it with the model "
                        "directory it was made for")
    try:
        spec = AdapterSpec(int(meta["rank"]), tuple(json.loads(meta["targets"])),
                           float(meta["scale"]))
    except (KeyError, ValueError, TypeError):
        raise UserError(f"{path}: its rank, targets or scale are missing or invalid; the "
                        "adapter file is damaged") from None
    if any(not np.isfinite(v).all() for v in tensors.values()):
        raise UserError(f"{path}: holds non-finite values; the adapter file is damaged")
    coords = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("coords/")}
    if coords:
        try:
            check_positions(coords, cfg)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
        if any(z.min() < 0 or z.max() >= 1 for z in coords.values()):
            raise UserError(f"{path}: its expert coordinates are not points of [0, 1)³")
    lora = unflatten_paths({k: v for k, v in tensors.items() if not k.startswith("coords/")})
    shapes = jax.eval_shape(lambda: init_lora(cfg.model, jax.random.key(0), spec.rank,
                                              spec.targets))
    want = {"/".join(str(getattr(p, "key", p)) for p in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    if {k: tuple(v.shape) for k, v in flatten_cache(lora).items()} != want:
        raise UserError(f"{path}: its adapters do not fit this model's layers (rank "
                        f"{spec.rank}, targets {list(spec.targets)})")
    return lora, spec, coords
