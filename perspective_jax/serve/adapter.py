"""A trained adapter on the server (`perspective-serve --adapter FILE`, SPEC §3.8):
each request decodes with it or without it (`perspective.adapter`, default on).

    served = ServedAdapter.attach(engine, "shakespeare.adapter")
    eng = served.engine_for(True)          # the engine as the adapted model
    logits, state = eng.forward(ids, state, ext)      # ext: the request's own (or None)

`engine_for(True)` is a view of the one streaming engine whose every call
(`forward`, `step`, `step_batch`) runs the adapted model (`adapt.attach.AdaptedEngine`:
the adapter's LoRA on each call's Extensions, and the routers at the file's expert
coordinates, for the call only, when it has them). Everything else is the engine's own, so `infer.mpd_engine.mpd_on_engine` and `infer.safety_guard` run on
it unchanged. `engine_for(False)` is the engine itself, routers as trained: a
request without the adapter is the plain model, bit for bit.
"""

from __future__ import annotations

import dataclasses

from perspective_jax.adapt.attach import AdaptedEngine, AttachedAdapter, attach_adapter


@dataclasses.dataclass(frozen=True)
class ServedAdapter:
    adapter: AttachedAdapter
    adapted: AdaptedEngine
    engine: object

    @classmethod
    def attach(cls, engine, path: str) -> "ServedAdapter":
        """Load `path` for `engine` (one-line UserError when it belongs to another model
        or is damaged); the engine itself keeps its trained routers."""
        trained = engine.layer_params
        adapter = attach_adapter(engine, path)      # moves the routers when it has coords
        moved = engine.layer_params if adapter.coords else None
        engine.layer_params = trained
        return cls(adapter, AdaptedEngine(engine, adapter, moved), engine)

    def engine_for(self, on: bool):
        return self.adapted if on else self.engine

    def info(self) -> dict:
        """What /health shows of it."""
        s = self.adapter.spec
        return {"path": self.adapter.path, "rank": s.rank, "targets": list(s.targets),
                "scale": s.scale, "coords": bool(self.adapter.coords)}
