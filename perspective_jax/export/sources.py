"""Where an export's parameters come from: a tree in memory, or a checkpoint read piece
by piece. Both answer the same two questions, so the export (`export.stream`) holds
only what it asks for and writes the same bytes from either:

    src.like                  # the parameter tree's ShapeDtypeStructs
    src.leaf("embed/embedding")          # a whole leaf that is not stacked over periods
    src.period(p)             # {layer_i: {...}}: every periods/ leaf at index p
"""

from __future__ import annotations

import jax
import numpy as np

from perspective_jax.errors import UserError
from perspective_jax.model.cache_io import unflatten_paths
from perspective_jax.model.transformer import is_predictor_path
from perspective_jax.rundir.partial_restore import ParamReader

PERIODS = "periods"


def leaf_paths(tree) -> list[str]:
    """'/'-joined paths of a parameter tree's leaves, in flatten order."""
    return ["/".join(str(k.key) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def at_path(tree, path: str):
    """tree's node at a '/'-joined path."""
    for name in path.split("/"):
        tree = tree[name]
    return tree


class TreeSource:
    """Parameters already in memory (arrays of any kind; read as numpy)."""

    def __init__(self, params):
        self.params = jax.tree.map(np.asarray, params)
        self.like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.params)

    def leaf(self, path: str) -> np.ndarray:
        return at_path(self.params, path)

    def period(self, p: int) -> dict:
        return jax.tree.map(lambda a: a[p], self.params[PERIODS])


class CheckpointSource:
    """Parameters of a checkpoint (`rundir.partial_restore.ParamReader`), cast to the
    dtypes of `like` (the model's abstract parameters) as a whole restore would. An
    expert-predictor head the checkpoint lacks (saved before the heads existed) reads
    as its fresh value, zeros, as `checkpoint.restore_params` gives it."""

    def __init__(self, reader: ParamReader, like):
        self.reader, self.like = reader, like
        self._periods = {path: leaf.dtype for path, leaf in zip(
            leaf_paths(like[PERIODS]), jax.tree.leaves(like[PERIODS]))}
        self.absent = {path for path in leaf_paths(like)
                       if is_predictor_path(path) and not self._stored(path)}

    def _stored(self, path: str) -> bool:
        try:
            self.reader.shape(path)
        except UserError:
            return False
        return True

    def _read(self, path: str, index: tuple = (), dtype=None) -> np.ndarray:
        if path in self.absent:
            return np.zeros(at_path(self.like, path).shape[len(index):], dtype)
        return self.reader.read(path, index, dtype)

    def leaf(self, path: str) -> np.ndarray:
        return self._read(path, dtype=at_path(self.like, path).dtype)

    def period(self, p: int) -> dict:
        return unflatten_paths({path: self._read(f"{PERIODS}/{path}", (p,), dtype)
                                for path, dtype in self._periods.items()})

    def chunk_bytes(self, paths) -> dict:
        """{path: bytes of one stored chunk} for '/'-joined parameter paths."""
        def absent_bytes(leaf):
            return int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        return {path: (absent_bytes(at_path(self.like, path)) if path in self.absent
                       else self.reader.chunk_bytes(path)) for path in paths}
