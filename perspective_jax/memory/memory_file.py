"""The memory file: a versioned binary format, written atomically, checksummed.

    MAGIC (8 bytes) | version u32 LE | header length u64 LE | header (UTF-8 JSON)
    | sections, each at a 64-byte aligned offset from the end of the header
    | sha256 of everything before it (32 bytes)

The header holds `format`, the memory's parameters (`dim`, `n_banks`, `seed`),
`next_id`, `entries`, the codebook (`codebook`: kind, input dimension; its centre is
a section), `model` (the model directory the codebook came from, or null), and
`sections`: name → {dtype, shape, offset, nbytes}. Sections: `banks` (bound) and `key_banks` [B, W] <u8,
`bank_sizes` [B] <i8, `centre` [d] <f4, `key_hv`/`value_hv` [N, W] <u8, `bank` [N]
<i4, `time` [N] <f8, `confidence` [N] <f4, `id` [N] <i8, `texts` (UTF-8 JSON Lines,
one [key, value] per entry).

A file that is not one, from a newer version, truncated, or with any byte changed
is a one-line `UserError` naming it. Writes go through `fileio.atomic_write`, so a
reader sees the old file or the new one whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Optional

import numpy as np

from perspective_jax.errors import UserError
from perspective_jax.fileio import atomic_write
from perspective_jax.memory import hypervector as hv
from perspective_jax.memory.banks import Banks
from perspective_jax.memory.store import HDMemory, MemoryParams, tie_vector

MAGIC = b"PJHDM\r\n\x1a"
VERSION = 1
ALIGN = 64
_DIGEST = 32
_SECTIONS = {  # name: (dtype, shape as a function of (header, N, W))
    "banks": ("<u8", lambda h, n, w: (h["n_banks"], w)),
    "key_banks": ("<u8", lambda h, n, w: (h["n_banks"], w)),
    "bank_sizes": ("<i8", lambda h, n, w: (h["n_banks"],)),
    "centre": ("<f4", lambda h, n, w: (h["codebook"]["in_dim"],)),
    "key_hv": ("<u8", lambda h, n, w: (n, w)),
    "value_hv": ("<u8", lambda h, n, w: (n, w)),
    "bank": ("<i4", lambda h, n, w: (n,)),
    "time": ("<f8", lambda h, n, w: (n,)),
    "confidence": ("<f4", lambda h, n, w: (n,)),
    "id": ("<i8", lambda h, n, w: (n,)),
}


class MemoryFile:
    """A memory with what it was encoded by: `memory` (HDMemory), `centre` [d] and
    `model` (an identity string or None)."""

    def __init__(self, memory: HDMemory, centre: np.ndarray, model: Optional[str]):
        self.memory, self.centre, self.model = memory, np.asarray(centre, np.float32), model


def to_bytes(mf: MemoryFile) -> bytes:
    mem = mf.memory
    arrays = {"banks": mem.banks.packed, "key_banks": mem.key_banks.packed,
              "bank_sizes": mem.banks.sizes, "centre": mf.centre,
              "key_hv": mem.key_hv, "value_hv": mem.value_hv, "bank": mem.bank,
              "time": mem.time, "confidence": mem.confidence, "id": mem.ids}
    texts = "".join(json.dumps(list(t), ensure_ascii=False) + "\n" for t in mem.texts)
    blobs, sections, offset = [], {}, 0
    for name, (dtype, _) in _SECTIONS.items():
        data = np.ascontiguousarray(np.asarray(arrays[name]).astype(dtype)).tobytes()
        blobs.append((offset, data))
        sections[name] = {"dtype": dtype, "shape": list(np.shape(arrays[name])),
                          "offset": offset, "nbytes": len(data)}
        offset = -(-(offset + len(data)) // ALIGN) * ALIGN
    tb = texts.encode("utf-8")
    sections["texts"] = {"dtype": "utf-8", "shape": [len(mem)], "offset": offset,
                         "nbytes": len(tb)}
    blobs.append((offset, tb))
    header = {"format": "perspective-memory", "dim": mem.params.dim,
              "n_banks": mem.params.n_banks, "seed": mem.params.seed,
              "next_id": mem.next_id, "entries": len(mem), "model": mf.model,
              "codebook": {"kind": "sign-projection", "generator": "numpy-pcg64",
                           "in_dim": int(mf.centre.size)},
              "sections": sections}
    hb = json.dumps(header, sort_keys=True).encode("utf-8")
    body = bytearray(MAGIC + struct.pack("<IQ", VERSION, len(hb)) + hb)
    start = len(body)
    for off, data in blobs:
        body.extend(b"\0" * (start + off - len(body)))
        body.extend(data)
    body.extend(hashlib.sha256(body).digest())
    return bytes(body)


def save(path: str, mf: MemoryFile) -> None:
    """Write atomically (temp file, fsync, rename)."""
    atomic_write(path, to_bytes(mf))


def _damaged(path: str, why: str) -> UserError:
    return UserError(f"memory file {path}: {why}; the file is damaged (restore it or "
                     "build it again)")


def load(path: str) -> MemoryFile:
    """Read and verify a memory file (module docstring) → MemoryFile."""
    if os.path.isdir(path):
        raise UserError(f"memory file {path} is a directory")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise UserError(f"memory file {path}: no such file (create it with "
                        "perspective-memory --memory FILE add …)") from None
    except OSError as exc:
        raise UserError(f"memory file {path}: cannot read it: {exc.strerror or exc}") from None
    if not data.startswith(MAGIC):
        raise UserError(f"{path} is not a Perspective memory file (no magic bytes)")
    head = len(MAGIC) + 12
    if len(data) < head + _DIGEST:
        raise _damaged(path, "truncated")
    version, hlen = struct.unpack("<IQ", data[len(MAGIC):head])
    if version > VERSION:
        raise UserError(f"memory file {path} has format version {version}; this version "
                        f"of perspective-jax reads up to {VERSION} (upgrade it)")
    if hashlib.sha256(data[:-_DIGEST]).digest() != data[-_DIGEST:]:
        raise _damaged(path, "truncated or changed (its sha256 does not match)")
    try:
        header = json.loads(data[head:head + hlen].decode("utf-8"))
        params = MemoryParams(int(header["dim"]), int(header["n_banks"]), int(header["seed"]))
        n, w = int(header["entries"]), hv.words(params.dim)
        start, end = head + hlen, len(data) - _DIGEST
        cols = {}
        for name, (dtype, shape_of) in _SECTIONS.items():
            s = header["sections"][name]
            shape = tuple(shape_of(header, n, w))
            off = start + int(s["offset"])
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            if s["dtype"] != dtype or tuple(s["shape"]) != shape or off + nbytes > end:
                raise ValueError(f"section {name}")
            cols[name] = np.frombuffer(data, dtype, int(np.prod(shape)), off).reshape(
                shape).astype(np.dtype(dtype).newbyteorder("="))
        s = header["sections"]["texts"]
        off = start + int(s["offset"])
        if off + int(s["nbytes"]) > end:
            raise ValueError("section texts")
        # one JSON array per "\n" (not str.splitlines: U+2028, U+0085 … are text)
        lines = data[off:off + int(s["nbytes"])].decode("utf-8").split("\n")
        texts = [tuple(json.loads(line)) for line in lines[:-1]]
        if lines[-1] or len(texts) != n or any(len(t) != 2 for t in texts):
            raise ValueError("texts")
    except UserError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise _damaged(path, f"its header or sections are inconsistent ({exc})") from None
    tie = tie_vector(params)
    banks = Banks(params.n_banks, params.dim, tie, cols["banks"], cols["bank_sizes"])
    key_banks = Banks(params.n_banks, params.dim, tie, cols["key_banks"], cols["bank_sizes"])
    mem = HDMemory(params, banks, key_banks, {"key_hv": cols["key_hv"], "value_hv": cols["value_hv"],
                                   "bank": cols["bank"], "time": cols["time"],
                                   "confidence": cols["confidence"], "id": cols["id"]},
                   [(k, v) for k, v in texts], int(header["next_id"]))
    return MemoryFile(mem, cols["centre"], header.get("model"))
