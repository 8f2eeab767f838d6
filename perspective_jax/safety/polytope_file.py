"""The polytope file (`polytope.spp`), written by the safety stage into its run
directory and by the export into the model directory (listed in its manifest).

    layout:  b"PSPP" | u32 version | u32 header length | header (JSON, UTF-8)
             | arrays (little-endian, in ARRAYS order) | sha256 of all bytes before it
The header holds the shapes, eps, the flagged strings and the build's metadata.
Written atomically; a damaged, truncated or newer file is a one-line error naming it.
"""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np

from perspective_jax.errors import UserError
from perspective_jax.fileio import atomic_write
from perspective_jax.safety.polytope import FORMAT_VERSION, Polytope

POLYTOPE_FILE = "polytope.spp"
MAGIC = b"PSPP"
# (field, dtype) in file order; shapes are in the header
ARRAYS = (("support_normals", "<f4"), ("support_bounds", "<f4"), ("flag_tokens", "<i4"),
          ("flag_caps", "<f4"), ("interior", "<f4"))


class PolytopeFileError(UserError):
    pass


def encode_polytope(poly: Polytope) -> bytes:
    arrays = [np.ascontiguousarray(np.asarray(getattr(poly, name)), dtype)
              for name, dtype in ARRAYS]
    header = json.dumps({"shapes": {name: list(a.shape) for (name, _), a in zip(ARRAYS, arrays)},
                         "eps": float(poly.eps), "flagged": list(poly.flagged),
                         "meta": poly.meta}, sort_keys=True).encode("utf-8")
    body = (MAGIC + struct.pack("<II", FORMAT_VERSION, len(header)) + header
            + b"".join(a.tobytes() for a in arrays))
    return body + hashlib.sha256(body).digest()


def write_polytope(path: str, poly: Polytope) -> str:
    """Write `poly` to `path` atomically; returns its sha256 (hex) for a manifest."""
    data = encode_polytope(poly)
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


def decode_polytope(data: bytes, where: str) -> Polytope:
    def bad(why: str) -> PolytopeFileError:
        return PolytopeFileError(f"{where} is not a usable polytope file: {why}")

    if len(data) < len(MAGIC) + 8 + 32 or data[:4] != MAGIC:
        raise bad("no polytope header (wrong file or truncated)")
    body, digest = data[:-32], data[-32:]
    version, hlen = struct.unpack("<II", data[4:12])
    if version > FORMAT_VERSION:
        raise bad(f"format version {version} is newer than this program's {FORMAT_VERSION}")
    if hashlib.sha256(body).digest() != digest:
        raise bad("checksum mismatch (damaged or truncated)")
    try:
        header = json.loads(data[12:12 + hlen].decode("utf-8"))
        offset, arrays = 12 + hlen, {}
        for name, dtype in ARRAYS:
            shape = tuple(int(n) for n in header["shapes"][name])
            count = int(np.prod(shape, dtype=np.int64))
            a = np.frombuffer(body, np.dtype(dtype), count, offset).reshape(shape)
            arrays[name] = a.astype(a.dtype.newbyteorder("="))
            offset += a.nbytes
        if offset != len(body):
            raise ValueError(f"{len(body) - offset} bytes left over")
        return Polytope(eps=float(header["eps"]), flagged=tuple(header["flagged"]),
                        meta=dict(header.get("meta", {})), **arrays)
    except UserError as exc:
        raise bad(str(exc)) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise bad(f"malformed contents ({' '.join(str(exc).split())[:100]})") from None


def read_polytope(path: str) -> Polytope:
    """The polytope in `path`, checked (module docstring)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise PolytopeFileError(f"cannot read polytope {path}: {exc.strerror or exc}") from None
    return decode_polytope(data, path)
