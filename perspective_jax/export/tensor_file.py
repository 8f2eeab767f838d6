"""A safetensors file written piece by piece, in any order, from its tensors' shapes.

    f = TensorFile(path, {"a": (np.float32, (P, 4, 8)), "b": (np.int8, (3,))})
    f.write("a", block, at=(p,))       # a[p] = block [4, 8]
    f.write("b", codes)                # the whole tensor
    f.close()                          # every byte of every tensor written, or RuntimeError

The bytes are those `safetensors.numpy.save` writes for the same tensors: an 8-byte
little-endian header length, the JSON header (entries in data order, padded with
spaces to a multiple of 8), then the data. The data order is the library's own,
asked of it with zero-length stand-ins of the same names and dtypes (it sorts by
dtype, then name, regardless of shape), so the file's layout is known before any
tensor exists and each piece goes straight to its offset: the writer never holds
more than the piece it is given.
"""

from __future__ import annotations

import json
import math

import numpy as np
from safetensors.numpy import save

from perspective_jax.fileio import naming

ALIGN = 8


def _layout(specs: dict) -> tuple[list[str], dict[str, str]]:
    """(names in data order, {name: safetensors dtype code}), from the library."""
    probe = save({name: np.zeros((0,), dtype) for name, (dtype, _) in specs.items()})
    n = int.from_bytes(probe[:8], "little")
    header = json.loads(probe[8: 8 + n])
    header.pop("__metadata__", None)
    order = list(header)              # the header lists its entries in data order
    return order, {k: header[k]["dtype"] for k in order}


class TensorFile:
    """A safetensors file of fixed tensors {name: (dtype, shape)} filled by `write`."""

    def __init__(self, path: str, specs: dict):
        self.path = path
        self.specs = {k: (np.dtype(d), tuple(int(s) for s in shape))
                      for k, (d, shape) in specs.items()}
        order, codes = _layout(self.specs)
        header, at = {}, 0
        self.start = {}
        for name in order:
            dtype, shape = self.specs[name]
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": codes[name], "shape": list(shape),
                            "data_offsets": [at, at + size]}
            self.start[name] = at
            at += size
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % ALIGN)
        self.base = 8 + len(text)
        self.left = {k: math.prod(s) * d.itemsize for k, (d, s) in self.specs.items()}
        with naming(path):
            self.fh = open(path, "wb")
            self.fh.write(len(text).to_bytes(8, "little") + text)
            self.fh.truncate(self.base + at)

    def write(self, name: str, array, at: tuple = ()) -> None:
        """Write `array` as `name`[at] (leading indices; () is the whole tensor)."""
        dtype, shape = self.specs[name]
        array = np.asarray(array)
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        if array.dtype != dtype or array.shape != shape[len(at):]:
            raise ValueError(f"{name}{list(at)}: got {array.dtype} {array.shape}, the file "
                             f"holds {dtype} {shape[len(at):]} there")
        index = np.ravel_multi_index(at, shape[:len(at)]) if at else 0
        offset = self.base + self.start[name] + int(index) * array.nbytes
        if array.nbytes:
            with naming(self.path):
                self.fh.seek(offset)
                self.fh.write(memoryview(array.reshape(-1)).cast("B"))
        self.left[name] -= array.nbytes

    def close(self) -> None:
        """Close the file; RuntimeError (a bug, never bad input) when a tensor was not
        written exactly once."""
        with naming(self.path):
            self.fh.close()
        wrong = [k for k, n in self.left.items() if n]
        if wrong:
            raise RuntimeError(f"{self.path}: tensors not written exactly once: {wrong[:5]}")
