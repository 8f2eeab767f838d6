"""An adapter file on a streaming engine (SPEC §3.8): what `perspective-infer
--adapter`, `perspective-serve --adapter` and `perspective-eval --adapter` load.

    adapter = attach_adapter(engine, "shakespeare.adapter")
    logits, state = engine.forward(ids, state, ext=adapter.extensions())

The file is checked against the engine's model (`adapter_file.load_adapters`: its
identity, shapes, checksum); adapted expert coordinates, if the file has them, are
put into the engine's routers at once (they are weights of the session's model, like
the adapters); the LoRA adapters travel per call through `Extensions.adapters`, so a
caller can leave them off for a request (`extensions(on=False)`)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from perspective_jax.adapt.adapter_file import AdapterSpec, load_adapters
from perspective_jax.adapt.coords import engine_layer_params
from perspective_jax.model.extensions import Extensions


@dataclasses.dataclass(frozen=True)
class AttachedAdapter:
    path: str
    lora: dict
    spec: AdapterSpec
    coords: dict

    def extensions(self, base: Optional[Extensions] = None, on: bool = True) -> Extensions:
        """`base` (default: the plain model's) with these adapters on (or off)."""
        base = Extensions() if base is None else base
        if not on:
            return base.replace(adapters=None)
        return base.replace(adapters=self.lora, adapter_scale=self.spec.scale)


def attach_adapter(engine, path: str) -> AttachedAdapter:
    """Load `path` for `engine` (module docstring); one-line UserError when it does
    not belong to the engine's model or is damaged."""
    lora, spec, coords = load_adapters(path, engine.identity, engine.cfg)
    if coords:
        engine.layer_params = engine_layer_params(engine, coords)
    lora = jax.device_put(jax.tree.map(jnp.asarray, lora), engine.device)
    return AttachedAdapter(path, lora, spec, coords)
