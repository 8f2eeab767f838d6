"""A trained adapter on the server (`perspective-serve --adapter FILE`, SPEC §3.8):
each request decodes with it or without it (`perspective.adapter`, default on).

    served = ServedAdapter.attach(engine, "shakespeare.adapter")
    eng = served.engine_for(True)          # the engine as the adapted model
    logits, state = eng.forward(ids, state, ext)      # ext: the request's own (or None)

`engine_for(True)` is a view of the one streaming engine whose every call
(`forward`, `step`, `step_batch`) runs the adapted model: the call's Extensions
(safety projection, MPD's views, an injected memory value — or none) with the
adapter's LoRA added (`AttachedAdapter.extensions`), and the routers at the file's
expert coordinates when it has them. Everything else (stats, final_info, …) is the
engine's own, so `infer.mpd_engine.mpd_on_engine` and `infer.safety_guard` run on
it unchanged. `engine_for(False)` is the engine itself, routers as trained: a
request without the adapter is the plain model, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

from perspective_jax.adapt.attach import AttachedAdapter, attach_adapter
from perspective_jax.model.extensions import Extensions


class _AdaptedEngine:
    """The engine with the adapter applied to every call (module docstring)."""

    def __init__(self, engine, adapter: AttachedAdapter, layer_params):
        self._engine, self._adapter, self._layer_params = engine, adapter, layer_params

    @contextlib.contextmanager
    def _routed(self):
        if self._layer_params is None:              # no coordinates in the file
            yield
            return
        saved = self._engine.layer_params
        self._engine.layer_params = self._layer_params
        try:
            yield
        finally:
            self._engine.layer_params = saved

    def _ext(self, ext: Optional[Extensions]) -> Extensions:
        return self._adapter.extensions(ext)

    def forward(self, tokens, state, ext=None, all_logits: bool = False):
        with self._routed():
            return self._engine.forward(tokens, state, self._ext(ext), all_logits=all_logits)

    def step(self, states, tokens, ext=None, **kw):
        with self._routed():
            return self._engine.step(states, tokens, self._ext(ext), **kw)

    def step_batch(self, batch, tokens, ext=None):
        with self._routed():
            return self._engine.step_batch(batch, tokens, self._ext(ext))

    def __getattr__(self, name):                    # stats, final_info, new_state, …
        return getattr(self._engine, name)


@dataclasses.dataclass(frozen=True)
class ServedAdapter:
    adapter: AttachedAdapter
    adapted: _AdaptedEngine
    engine: object

    @classmethod
    def attach(cls, engine, path: str) -> "ServedAdapter":
        """Load `path` for `engine` (one-line UserError when it belongs to another model
        or is damaged); the engine itself keeps its trained routers."""
        trained = engine.layer_params
        adapter = attach_adapter(engine, path)      # moves the routers when it has coords
        moved = engine.layer_params if adapter.coords else None
        engine.layer_params = trained
        return cls(adapter, _AdaptedEngine(engine, adapter, moved), engine)

    def engine_for(self, on: bool):
        return self.adapted if on else self.engine

    def info(self) -> dict:
        """What /health shows of it."""
        s = self.adapter.spec
        return {"path": self.adapter.path, "rank": s.rank, "targets": list(s.targets),
                "scale": s.scale, "coords": bool(self.adapter.coords)}
