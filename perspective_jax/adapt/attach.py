"""An adapter file on a streaming engine (SPEC §3.8): what `perspective-infer
--adapter`, `perspective-serve --adapter` and `perspective-eval --adapter` load.

    adapter = attach_adapter(engine, "shakespeare.adapter")
    logits, state = engine.forward(ids, state, ext=adapter.extensions())
    adapted = AdaptedEngine(engine, adapter)      # the same, on every call

The file is checked against the engine's model (`adapter_file.load_adapters`: its
identity, shapes, checksum); adapted expert coordinates, if the file has them, are
put into the engine's routers at once (they are weights of the session's model, like
the adapters); the LoRA adapters travel per call through `Extensions.adapters`, so a
caller can leave them off for a request (`extensions(on=False)`)."""

from __future__ import annotations

import contextlib
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


class AdaptedEngine:
    """`engine` whose every `forward`, `step` and `step_batch` runs the adapted model:
    the call's Extensions (safety projection, MPD's views, an injected memory value —
    or none) with the adapter's LoRA added (`AttachedAdapter.extensions`), and — when
    `layer_params` is given — the routers at those (the adapter's expert coordinates)
    for the call only, so the engine itself stays the trained model. Everything else
    (stats, final_info, new_state, …) is the engine's own."""

    def __init__(self, engine, adapter: AttachedAdapter, layer_params=None):
        self._engine, self._adapter, self._layer_params = engine, adapter, layer_params

    @contextlib.contextmanager
    def _routed(self):
        if self._layer_params is None:              # routers as the engine has them
            yield
            return
        saved = self._engine.layer_params
        self._engine.layer_params = self._layer_params
        try:
            yield
        finally:
            self._engine.layer_params = saved

    def forward(self, tokens, state, ext=None, all_logits: bool = False):
        with self._routed():
            return self._engine.forward(tokens, state, self._adapter.extensions(ext),
                                        all_logits=all_logits)

    def step(self, states, tokens, ext=None, **kw):
        with self._routed():
            return self._engine.step(states, tokens, self._adapter.extensions(ext), **kw)

    def step_batch(self, batch, tokens, ext=None):
        with self._routed():
            return self._engine.step_batch(batch, tokens, self._adapter.extensions(ext))

    def __getattr__(self, name):                    # stats, final_info, new_state, …
        return getattr(self._engine, name)
