"""Packed ternary formats (SPEC §3.4), numpy, lossless.

* base-3, 5 trits per byte (storage / transfer): byte = Σ_{i<5} (t_i + 1)·3^i ∈ [0, 242]
  — 1.6 bits per weight.
* 2-bit codes, 4 per byte (compute): code = t + 1 ∈ {0, 1, 2} in bits 2i..2i+1
  — decoded through a 256-entry lookup table, 2 bits per weight.

Trits are int8 in {−1, 0, +1}, flattened in C order; a tensor's length need not
be a multiple of 5 or 4 (the tail of the last byte is padding, value 0 trit).
`TernaryTensor` bundles codes, shape and scales (one per tensor or per row).
"""

from __future__ import annotations

import dataclasses

import numpy as np

TRITS_PER_BYTE = 5
CODES_PER_BYTE = 4
_POW3 = np.array([1, 3, 9, 27, 81], np.uint16)


def _check_trits(trits: np.ndarray) -> np.ndarray:
    t = np.asarray(trits)
    if t.size and (t.min() < -1 or t.max() > 1):
        raise ValueError("trits must lie in {-1, 0, +1}")
    return t.reshape(-1).astype(np.int8)


def pack_base3(trits) -> np.ndarray:
    """[n] trits → [ceil(n/5)] uint8 (values 0..242)."""
    t = _check_trits(trits)
    pad = (-t.size) % TRITS_PER_BYTE
    digits = np.concatenate([t, np.zeros(pad, np.int8)]).reshape(-1, TRITS_PER_BYTE) + 1
    return (digits.astype(np.uint16) @ _POW3).astype(np.uint8)


# [243, 5] table: the five trits of every valid base-3 byte.
_BASE3_TABLE = (np.arange(243)[:, None] // _POW3[None, :].astype(np.int64) % 3 - 1).astype(np.int8)


def unpack_base3(packed, n: int) -> np.ndarray:
    """[ceil(n/5)] uint8 → [n] int8 trits."""
    packed = np.asarray(packed, np.uint8)
    if packed.size and packed.max() > 242:
        raise ValueError("corrupt base-3 data: byte value above 242")
    return _BASE3_TABLE[packed].reshape(-1)[:n]


def pack_2bit(trits) -> np.ndarray:
    """[n] trits → [ceil(n/4)] uint8, code t+1 in bits 2i..2i+1 of each byte."""
    t = _check_trits(trits)
    pad = (-t.size) % CODES_PER_BYTE
    codes = (np.concatenate([t, np.zeros(pad, np.int8)]) + 1).astype(np.uint8)
    codes = codes.reshape(-1, CODES_PER_BYTE)
    return (codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)).astype(
        np.uint8)


# [256, 4] table: the four trits of every 2-bit-code byte (code 3 is invalid → 0).
_CODE_TABLE = np.stack([((np.arange(256) >> (2 * i)) & 3) for i in range(4)], axis=1)
LUT_2BIT = np.where(_CODE_TABLE == 3, 0, _CODE_TABLE - 1).astype(np.int8)


def unpack_2bit(packed, n: int) -> np.ndarray:
    """[ceil(n/4)] uint8 → [n] int8 trits (through the 256-entry lookup table)."""
    return LUT_2BIT[np.asarray(packed, np.uint8)].reshape(-1)[:n]


def absmean_ternarize(w, granularity: str = "tensor", eps: float = 1e-8):
    """BitNet b1.58: scale = mean|W| (per tensor, or per row = leading axis);
    trits = clip(round(W / scale), −1, 1). Returns (int8 trits, float32 scales)."""
    w = np.asarray(w, np.float32)
    if granularity == "tensor":
        scale = np.abs(w).mean(keepdims=True)
    elif granularity == "row":
        scale = np.abs(w).reshape(w.shape[0], -1).mean(1).reshape((-1,) + (1,) * (w.ndim - 1))
    else:
        raise ValueError(f"granularity must be 'tensor' or 'row', got {granularity!r}")
    trits = np.clip(np.round(w / (scale + eps)), -1, 1).astype(np.int8)
    return trits, scale.reshape(-1).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class TernaryTensor:
    """A packed ternary tensor: value = trits × scale (scale per tensor or per row)."""

    packed: np.ndarray          # uint8
    shape: tuple[int, ...]
    scales: np.ndarray          # float32 [1] or [shape[0]]
    fmt: str                    # "base3" | "2bit"

    @classmethod
    def from_float(cls, w, fmt: str = "base3", granularity: str = "tensor") -> "TernaryTensor":
        trits, scales = absmean_ternarize(w, granularity)
        pack = pack_base3 if fmt == "base3" else pack_2bit
        return cls(pack(trits), tuple(np.shape(w)), scales, fmt)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def trits(self) -> np.ndarray:
        unpack = unpack_base3 if self.fmt == "base3" else unpack_2bit
        return unpack(self.packed, self.size).reshape(self.shape)

    def dequantize(self) -> np.ndarray:
        t = self.trits().astype(np.float32)
        if self.scales.size == 1:
            return t * self.scales[0]
        return t * self.scales.reshape((-1,) + (1,) * (len(self.shape) - 1))

    def nbytes(self) -> int:
        return int(self.packed.nbytes + self.scales.nbytes)


def sparsity(trits) -> float:
    """Share of zero trits."""
    t = np.asarray(trits)
    return float((t == 0).mean()) if t.size else 0.0
