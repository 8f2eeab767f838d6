"""One sequence's decode state on the streaming engine, and the model's cache layout.

    state = EngineState.from_cache(init_cache(cfg, 1))     # empty: engine.new_state()
    cache = state.to_cache()        # {"periods": {"layer_i": [P, 1, ...]}, "next_pos": [1]}

`layers[p][i]` is the cache of layer i of period p for one sequence (batch axis of
size 1: a PDR state or a KV ring, the model's own cache type); `next_pos` is the
position of the next token. A state is a pytree and immutable: every feed returns
a new one. `stack`/`split` turn a list of states into the batched layer caches a
batched step runs on and back, so sequences can join and leave between steps.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class EngineState(NamedTuple):
    layers: tuple            # layers[p][i]: cache of layer i of period p, batch 1
    next_pos: int

    @classmethod
    def from_cache(cls, cache: dict, row: int = 0) -> "EngineState":
        """Sequence `row` of a model cache (`init_cache` layout, periods stacked on axis 0)."""
        periods = cache["periods"]
        names = sorted(periods, key=lambda name: int(name.split("_")[1]))
        n_periods = jax.tree.leaves(periods)[0].shape[0]
        layers = tuple(tuple(jax.tree.map(lambda a, p=p: a[p, row: row + 1], periods[name])
                             for name in names)
                       for p in range(n_periods))
        return cls(layers, int(np.asarray(cache["next_pos"])[row]))

    def to_cache(self) -> dict:
        """The model's cache layout (batch 1), e.g. for saving with `cache_io`."""
        periods = {f"layer_{i}": jax.tree.map(lambda *a: jnp.stack(a),
                                              *(row[i] for row in self.layers))
                   for i in range(len(self.layers[0]))}
        return {"periods": periods, "next_pos": jnp.asarray([self.next_pos], jnp.int32)}


def stack(states: list) -> list:
    """Per-(period, layer) caches of all `states` concatenated along the batch axis
    (mutable lists, as a step updates them layer by layer)."""
    first = states[0].layers
    return [[jax.tree.map(lambda *a: jnp.concatenate(a), *(s.layers[p][i] for s in states))
             for i in range(len(first[p]))] for p in range(len(first))]


def split(layers: list, next_pos) -> list:
    """Inverse of `stack`: one EngineState per batch row, at positions `next_pos`."""
    return [EngineState(tuple(tuple(jax.tree.map(lambda a, b=b: a[b: b + 1], c) for c in row)
                              for row in layers), int(pos))
            for b, pos in enumerate(next_pos)]
