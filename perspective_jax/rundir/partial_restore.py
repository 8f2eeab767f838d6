"""Read a checkpoint's parameters piece by piece, never the whole model at once.

    reader = ParamReader(run_dir, source="--run-dir")  # latest complete step; metadata only
    reader.verify()                                    # its checksum list, as restore_params
    reader.shape("periods/layer_0/ffn/w_gate")         # (P, E, K, N)
    reader.read("periods/layer_0/ffn/w_gate", (3,))    # [E, K, N]: period 3's slice
    reader.read("embed/embedding")                     # a whole leaf
    reader.chunk_bytes("periods/layer_0/ffn/w_gate")   # bytes one stored chunk decodes to

The parameters are the `params` subtree of the checkpoint's `state` item. Orbax
stores every array as a zarr array in an OCDBT key-value store under the '.'-joined
key path (`params.periods.layer_0.ffn.w_gate`), in compressed chunks; tensorstore
reads any sub-box of one (the read spec is orbax's own, `get_json_tspec_read`).
A compressed chunk is decoded whole, so `read` walks the chunks a box touches one
at a time: it holds the result plus one decoded chunk and its piece. The trainer
writes each array in chunks of its shard shape (one chunk per array on a single
device), so a period's slice of a stacked [P, ...] array may decode a chunk that
holds every period; `chunk_bytes` says how much, for callers that budget memory.

The step is chosen and its files checked exactly as `checkpoint.restore_params`
does (the newest step that carries a checksum list; `verify` before any read of
array data); a verified step orbax still cannot read is one line
(`checkpoint._unreadable`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from typing import Optional

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from perspective_jax.errors import UserError
from perspective_jax.rundir import checkpoint_steps as steps
from perspective_jax.rundir.checkpoint import (_damaged, _quiet_logs, _unreadable,
                                               complete_step)

STATE_ITEM = "state"          # the Composite item holding params, opt_state, step
PARAMS_KEY = "params"
OCDBT_CACHE_BYTES = 8 << 20   # tensorstore's cache of OCDBT B-tree nodes (metadata only)


def _storage(state_dir: str) -> tuple[bool, bool]:
    """(use_ocdbt, use_zarr3) of a saved pytree, from orbax's own metadata file."""
    meta = {}
    try:
        with open(os.path.join(state_dir, "_METADATA"), encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        pass
    ocdbt = meta.get("use_ocdbt")
    if ocdbt is None:
        ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(epath.Path(state_dir))
    return bool(ocdbt), bool(meta.get("use_zarr3", False))


class ParamReader:
    """The parameters of the newest complete checkpoint of `run_dir`, read by leaf or
    by slice. Paths are '/'-joined parameter paths ('embed/embedding')."""

    def __init__(self, run_dir: str, source: str = "--run-dir"):
        self.source = source
        self.directory, self.step = complete_step(run_dir, source)
        self.state_dir = os.path.join(self.directory, str(self.step), STATE_ITEM)
        self._ocdbt, self._zarr3 = _storage(self.state_dir)
        self._context = ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": OCDBT_CACHE_BYTES},
                                    "file_io_concurrency": {"limit": 8}})
        self._open: dict[str, ts.TensorStore] = {}
        self._verified = False

    def verify(self) -> None:
        """Check every file of the step against its checksum list (UserError naming the
        damaged file and what to do)."""
        if not self._verified:
            what = steps.problem(os.path.join(self.directory, str(self.step)), self.step)
            if what:
                raise _damaged(self.directory, self.step, what, self.source)
            self._verified = True

    def _fail(self, exc: BaseException) -> UserError:
        self.verify()                    # a damaged file: name it rather than the symptom
        return _unreadable(self.directory, self.step, exc, self.source)

    def _store(self, path: str) -> ts.TensorStore:
        if path not in self._open:
            name = ".".join((PARAMS_KEY, *path.split("/")))
            info = ocp.type_handlers.ParamInfo(name=name, parent_dir=epath.Path(self.state_dir),
                                               use_zarr3=self._zarr3, ts_context=self._context)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._ocdbt)
            try:
                with _quiet_logs():
                    self._open[path] = ts.open(spec, open=True, read=True,
                                               context=self._context).result()
            except Exception as exc:     # missing or damaged: tensorstore raises many kinds
                raise self._fail(exc) from None
        return self._open[path]

    def shape(self, path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in self._store(path).shape)

    def dtype(self, path: str) -> np.dtype:
        return np.dtype(self._store(path).dtype.numpy_dtype)

    def chunk_shape(self, path: str) -> tuple[int, ...]:
        t = self._store(path)
        chunk = t.chunk_layout.read_chunk.shape
        return tuple(int(c) if c else int(n) for c, n in zip(chunk, t.shape))

    def chunk_bytes(self, path: str) -> int:
        """Bytes of one decoded chunk of `path` (the most `read` decodes at once)."""
        return math.prod(self.chunk_shape(path)) * self.dtype(path).itemsize

    def read(self, path: str, index: tuple[int, ...] = (),
             dtype: Optional[np.dtype] = None) -> np.ndarray:
        """`path`[index] (leading integer indices; () is the whole leaf) as a numpy
        array of `dtype` (default: as stored), read one stored chunk at a time."""
        self.verify()
        t = self._store(path)
        shape = self.shape(path)
        if len(index) > len(shape) or any(not 0 <= i < n for i, n in zip(index, shape)):
            raise IndexError(f"{path}: index {index} outside shape {shape}")
        lo = tuple(index) + (0,) * (len(shape) - len(index))
        hi = tuple(i + 1 for i in index) + shape[len(index):]
        out = np.empty(tuple(h - l for l, h in zip(lo, hi)), self.dtype(path))
        chunk = self.chunk_shape(path)
        cells = [range(l // c, -(-h // c)) for l, h, c in zip(lo, hi, chunk)]
        try:
            with _quiet_logs():
                for cell in itertools.product(*cells):
                    a = [max(l, k * c) for l, k, c in zip(lo, cell, chunk)]
                    b = [min(h, (k + 1) * c) for h, k, c in zip(hi, cell, chunk)]
                    if any(x >= y for x, y in zip(a, b)):
                        continue
                    box = tuple(slice(x, y) for x, y in zip(a, b))
                    dest = tuple(slice(x - l, y - l) for x, y, l in zip(a, b, lo))
                    out[dest] = t[box].read().result()
        except Exception as exc:         # damaged data: tensorstore raises many kinds
            raise self._fail(exc) from None
        out = out.reshape(shape[len(index):])
        return out if dtype is None else out.astype(dtype, copy=False)
