"""Banks: bundles of bound key ⊕ value pairs by per-bit majority, with the counters
kept so a pair can be added or removed without rebuilding the bank (SPEC §3.7).

For bank b holding n pairs with bound vectors u_1..u_n (bits, {0, 1}^D):

    c_b[j]   = Σ_i u_i[j]                          (the kept counters, int32)
    bank_b[j] = 1 if 2·c_b[j] > n,  0 if 2·c_b[j] < n,  tie[j] if 2·c_b[j] = n

`tie` is one seeded random hypervector, so ties (always possible with an even n,
and the empty bank) break the same way on every machine. The packed banks [B, W]
are what retrieval reads and what a memory file stores; the counters of a bank are
built from its members the first time it changes (`members(b)` → [n, W] bound
vectors), so a memory loaded only to answer queries never builds them.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from perspective_jax.memory import hypervector as hv


def majority(counts: np.ndarray, n, tie: np.ndarray, dim: int) -> np.ndarray:
    """Packed per-bit majority of n vectors from their counters [..., dim] (n [...]),
    ties broken by `tie` [W]."""
    n = np.asarray(n)[..., None]
    twice = 2 * counts.astype(np.int64)
    bits = np.where(twice == n, hv.unpack(tie, dim), twice > n)
    return hv.pack(bits)


class Banks:
    """`n_banks` bundles of `dim`-bit vectors (module docstring)."""

    def __init__(self, n_banks: int, dim: int, tie: np.ndarray,
                 packed: np.ndarray = None, sizes: np.ndarray = None):
        self.n_banks, self.dim, self.tie = n_banks, dim, np.asarray(tie, np.uint64)
        w = hv.words(dim)
        if packed is None:
            packed = np.broadcast_to(self.tie, (n_banks, w)).copy()   # empty: all ties
        self.packed = np.ascontiguousarray(packed, np.uint64)
        self.sizes = (np.zeros(n_banks, np.int64) if sizes is None
                      else np.asarray(sizes, np.int64).copy())
        self._counts: dict[int, np.ndarray] = {}

    def _counters(self, bank: int, members: Callable[[int], np.ndarray]) -> np.ndarray:
        counts = self._counts.get(bank)
        if counts is None:
            bound = members(bank)
            counts = (hv.unpack(bound, self.dim).sum(axis=0, dtype=np.int32)
                      if len(bound) else np.zeros(self.dim, np.int32))
            self._counts[bank] = counts
        return counts

    def add(self, bank: int, bound: np.ndarray, members: Callable[[int], np.ndarray]):
        """Bundle one more bound vector [W] into `bank` (`members`: its vectors before)."""
        counts = self._counters(bank, members)
        counts += hv.unpack(bound, self.dim)
        self.sizes[bank] += 1
        self._refresh(bank)

    def remove(self, bank: int, bound: np.ndarray, members: Callable[[int], np.ndarray]):
        """Take a bound vector [W] out of `bank` (`members`: its vectors before, incl. it)."""
        counts = self._counters(bank, members)
        counts -= hv.unpack(bound, self.dim)
        self.sizes[bank] -= 1
        self._refresh(bank)

    def _refresh(self, bank: int) -> None:
        self.packed[bank] = majority(self._counts[bank], self.sizes[bank], self.tie,
                                     self.dim)

    @classmethod
    def rebuild(cls, n_banks: int, dim: int, tie: np.ndarray, bank_of: np.ndarray,
                bound: np.ndarray) -> "Banks":
        """Banks from scratch: vector i [W] of `bound` [N, W] into bank `bank_of[i]`
        (counters only for the banks used; an empty bank is the tie vector)."""
        out = cls(n_banks, dim, tie)
        bank_of = np.asarray(bank_of, np.int64)
        out.sizes = np.bincount(bank_of, minlength=n_banks).astype(np.int64)
        used = np.flatnonzero(out.sizes)
        slot = np.zeros(n_banks, np.int64)
        slot[used] = np.arange(len(used))
        counts = np.zeros((len(used), dim), np.int32)
        order = np.argsort(bank_of, kind="stable")
        step = 1024
        for i in range(0, len(order), step):      # rows sorted by bank: a run per bank
            rows = order[i:i + step]
            b = bank_of[rows]
            ends = np.flatnonzero(np.r_[b[1:] != b[:-1], True])      # last row of a run
            total = np.cumsum(hv.unpack(bound[rows], dim), axis=0, dtype=np.int32)
            run = total[ends]
            run[1:] -= total[ends[:-1]]
            counts[slot[b[ends]]] += run
        if len(used):
            out.packed[used] = majority(counts, out.sizes[used], tie, dim)
        return out
