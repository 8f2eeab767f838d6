"""One sequence's decode state on the streaming engine, and the model's cache layout.

    state = EngineState.from_cache(init_cache(cfg, 1))     # empty: engine.new_state()
    cache = state.to_cache()        # {"periods": {"layer_i": [P, 1, ...]}, "next_pos": [1]}

`layers[p][i]` is the cache of layer i of period p for one sequence (batch axis of
size 1: a PDR state or a KV ring, the model's own cache type); `next_pos` is the
position of the next token. A state is a pytree and immutable: every feed returns
a new one. `stack`/`split` turn a list of states into the batched layer caches a
batched step runs on and back, so sequences can join and leave between steps.

A `Batch` keeps B sequences stacked between steps (`StreamingEngine.step_batch`):
splitting and stacking cost more than the step itself at B = 16 on CPU, so a server
rebuilds its batch only when sequences join or leave (`take_rows`, `concat`,
`batch_of`), and reads one row out (`row`) only when it needs it.
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


class Batch(NamedTuple):
    layers: tuple            # layers[p][i]: caches of B sequences (batch axis 0)
    next_pos: np.ndarray     # [B] position of each sequence's next token

    @property
    def size(self) -> int:
        return int(self.next_pos.shape[0])


def batch_of(states: list) -> Batch:
    """B single-sequence states stacked into one Batch."""
    return Batch(tuple(tuple(row) for row in stack(states)),
                 np.asarray([s.next_pos for s in states], np.int32))


def take_rows(batch: Batch, rows) -> Batch:
    """The Batch of `batch`'s rows `rows` (in that order; a row may repeat)."""
    idx = jnp.asarray(np.asarray(rows, np.int32))
    return Batch(jax.tree.map(lambda a: jnp.take(a, idx, axis=0), batch.layers),
                 batch.next_pos[np.asarray(rows, np.int64)])


def concat(a: Batch, b: Batch) -> Batch:
    """a's rows then b's."""
    return Batch(jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a.layers, b.layers),
                 np.concatenate([a.next_pos, b.next_pos]))


def row(batch: Batch, b: int) -> EngineState:
    """Row b of a batch as a single-sequence state."""
    return EngineState(jax.tree.map(lambda a: a[b: b + 1], batch.layers),
                       int(batch.next_pos[b]))


def unbatch(batch: Batch) -> list:
    """Every row of a batch as a single-sequence state (`split`)."""
    return split([list(r) for r in batch.layers], batch.next_pos)
