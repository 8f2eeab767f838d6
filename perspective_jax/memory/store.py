"""The associative memory: banks of key ⊕ value bundles plus the entry store
(SPEC §3.7).

    mem = HDMemory.new(MemoryParams(dim=10_000, n_banks=2000, seed=0))
    i = mem.add(key_hv, value_hv, key="the capital of Zorbin", value="Quartzville")
    hit = mem.query(key_hv, probes=8)       # Hit(row, similarity, bank) or None
    hits = mem.query_many(keys [Q, W], probes=8)

A pair goes to the bank whose seeded centroid is nearest its key (Hamming). Each
bank keeps two bundles (`banks.Banks`): of its bound vectors key ⊕ value, and of its
keys (the bank's index). A query picks its `probes` candidate banks by the
similarity of their key bundles to it — a key, exact or with bits flipped, is
nearer the bundle it is part of than any other bank's (0.69 against 0.5 with five
keys a bank; 30 % flipped: 0.57) — then unbinds itself from each candidate's bound
bundle, bank ⊕ query ≈ the stored value plus the noise of the bank's other pairs,
and compares that with the values stored in the bank; the nearest one wins, with
its similarity 1 − hamming / D (≈ 0.5 unrelated; with n pairs in a bank an exact
key's is ≈ P(majority of n keeps a bit), 0.69 at n = 5).

Entries are columns: key/value hypervectors [N, W], bank [N], time [N] (seconds
since the epoch), confidence [N] (the caller's, in [0, 1]), id [N] (never reused),
and the key and value texts. Adding a key text that is already stored replaces
that entry.
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple, Optional

import numpy as np

from perspective_jax.errors import UserError
from perspective_jax.memory import hypervector as hv
from perspective_jax.memory.banks import Banks


@dataclasses.dataclass(frozen=True)
class MemoryParams:
    """What a memory is built with and stores: `dim` bits per hypervector, `n_banks`,
    `seed` (bank centroids, the tie-break vector and the codebook's projection)."""

    dim: int = hv.DIM
    n_banks: int = 2000
    seed: int = 0

    def __post_init__(self):
        hv.check_dim(self.dim)
        if not isinstance(self.n_banks, int) or not 1 <= self.n_banks <= 1_000_000:
            raise UserError(f"memory banks {self.n_banks}: must be an integer in 1..1000000")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise UserError(f"memory seed {self.seed}: must be an integer in [0, 2^63)")


_TAG = 0x48444D   # "HDM": keeps these streams apart from default_rng(seed)


def seeded(seed: int, stream: int) -> np.random.Generator:
    """The generator of one of a memory's seeded streams (0 centroids, 1 tie-break,
    2 the codebook's projection): NumPy's PCG64, the same on every machine."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([_TAG, seed, stream])))


def tie_vector(params: MemoryParams) -> np.ndarray:
    """The seeded vector [W] whose bits break the banks' majority ties."""
    return hv.random(seeded(params.seed, 1), 1, params.dim)[0]


class Hit(NamedTuple):
    row: int            # the entry's row in the store
    similarity: float   # 1 − hamming(bank ⊕ query, value) / D
    bank: int


class HDMemory:
    def __init__(self, params: MemoryParams, banks: Banks, key_banks: Banks, columns: dict,
                 texts: list, next_id: int):
        self.params, self.banks, self.key_banks = params, banks, key_banks
        self.key_hv, self.value_hv = columns["key_hv"], columns["value_hv"]
        self.bank, self.time = columns["bank"], columns["time"]
        self.confidence, self.ids = columns["confidence"], columns["id"]
        self.texts = texts                         # [(key text | None, value text | None)]
        self.next_id = next_id
        self.centroids = hv.random(seeded(params.seed, 0), params.n_banks, params.dim)
        self._members = None                       # [n_banks, max size] rows, -1 padded
        self._by_key = None

    @classmethod
    def new(cls, params: MemoryParams = MemoryParams()) -> "HDMemory":
        w = hv.words(params.dim)
        cols = {"key_hv": np.zeros((0, w), np.uint64), "value_hv": np.zeros((0, w), np.uint64),
                "bank": np.zeros(0, np.int32), "time": np.zeros(0, np.float64),
                "confidence": np.zeros(0, np.float32), "id": np.zeros(0, np.int64)}
        tie = tie_vector(params)
        return cls(params, Banks(params.n_banks, params.dim, tie),
                   Banks(params.n_banks, params.dim, tie), cols, [], 0)

    def __len__(self) -> int:
        return len(self.bank)

    # ------------------------------------------------------------------ writing
    def bank_of(self, keys: np.ndarray, probes: int = 1, index=None) -> np.ndarray:
        """The `probes` banks nearest each key [Q, W] → [Q, probes] (nearest first), by
        `index` [n_banks, W]: the centroids (where a pair is stored) by default."""
        dist = hv.hamming_table(keys, self.centroids if index is None else index)
        probes = min(probes, self.params.n_banks)
        part = np.argpartition(dist, probes - 1, axis=1)[:, :probes]
        order = np.argsort(np.take_along_axis(dist, part, 1), axis=1, kind="stable")
        return np.take_along_axis(part, order, 1)

    def _bound_of(self, bank: int) -> np.ndarray:
        rows = np.flatnonzero(self.bank == bank)
        return hv.bind(self.key_hv[rows], self.value_hv[rows])

    def _keys_of(self, bank: int) -> np.ndarray:
        return self.key_hv[np.flatnonzero(self.bank == bank)]

    def add(self, key_hv: np.ndarray, value_hv: np.ndarray, key: Optional[str] = None,
            value: Optional[str] = None, confidence: float = 1.0,
            timestamp: Optional[float] = None) -> int:
        """Store one pair ([W] each); returns its id. A stored `key` text is replaced."""
        if not 0.0 <= confidence <= 1.0:
            raise UserError(f"confidence {confidence}: must lie in [0, 1]")
        key_hv, value_hv = self._vector(key_hv), self._vector(value_hv)
        if key is not None:
            old = self.find(key)
            if old is not None:
                self.remove_rows([old])
        bank = int(self.bank_of(key_hv[None])[0, 0])
        self.banks.add(bank, hv.bind(key_hv, value_hv), self._bound_of)
        self.key_banks.add(bank, key_hv, self._keys_of)
        self.key_hv = np.concatenate([self.key_hv, key_hv[None]])
        self.value_hv = np.concatenate([self.value_hv, value_hv[None]])
        self.bank = np.append(self.bank, np.int32(bank))
        self.time = np.append(self.time, time.time() if timestamp is None else timestamp)
        self.confidence = np.append(self.confidence, np.float32(confidence))
        self.ids = np.append(self.ids, np.int64(self.next_id))
        self.texts.append((key, value))
        self.next_id += 1
        self._changed()
        return self.next_id - 1

    def add_many(self, key_hvs: np.ndarray, value_hvs: np.ndarray, keys=None, values=None,
                 confidence: float = 1.0) -> None:
        """Store many pairs at once (no replacement by key text: a bulk load);
        the banks are bundled with one counter pass per touched bank."""
        key_hvs, value_hvs = np.atleast_2d(key_hvs), np.atleast_2d(value_hvs)
        n = len(key_hvs)
        keys = [None] * n if keys is None else list(keys)
        values = [None] * n if values is None else list(values)
        banks = self.bank_of(key_hvs)[:, 0].astype(np.int32)
        self.key_hv = np.concatenate([self.key_hv, key_hvs])
        self.value_hv = np.concatenate([self.value_hv, value_hvs])
        self.bank = np.concatenate([self.bank, banks])
        self.time = np.concatenate([self.time, np.full(n, time.time())])
        self.confidence = np.concatenate([self.confidence, np.full(n, confidence, np.float32)])
        self.ids = np.concatenate([self.ids, self.next_id + np.arange(n, dtype=np.int64)])
        self.texts.extend(zip(keys, values))
        self.next_id += n
        self.rebuild_banks()

    def remove_rows(self, rows) -> None:
        """Take entries (by row) out of the store and their banks."""
        rows = sorted({int(r) for r in rows}, reverse=True)
        for r in rows:
            bank = int(self.bank[r])
            self.banks.remove(bank, hv.bind(self.key_hv[r], self.value_hv[r]), self._bound_of)
            self.key_banks.remove(bank, self.key_hv[r], self._keys_of)
            # the counters now exclude r: drop it before the next bank build reads it
            self._delete(r)

    def _delete(self, r: int) -> None:
        for name in ("key_hv", "value_hv", "bank", "time", "confidence", "ids"):
            setattr(self, name, np.delete(getattr(self, name), r, axis=0))
        del self.texts[r]
        self._changed()

    def rebuild_banks(self) -> None:
        """Re-bundle every bank from the entries (what incremental updates must equal)."""
        p, tie = self.params, self.banks.tie
        self.banks = Banks.rebuild(p.n_banks, p.dim, tie, self.bank,
                                   hv.bind(self.key_hv, self.value_hv))
        self.key_banks = Banks.rebuild(p.n_banks, p.dim, tie, self.bank, self.key_hv)
        self._changed()

    def _changed(self) -> None:
        self._members, self._by_key = None, None

    def _vector(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype != np.uint64 or x.shape != (hv.words(self.params.dim),):
            raise UserError(f"a hypervector of this memory is uint64 "
                            f"[{hv.words(self.params.dim)}]; got {x.dtype} {list(x.shape)}")
        return x

    # ------------------------------------------------------------------ reading
    def find(self, key: str) -> Optional[int]:
        """The row whose key text is `key`, or None."""
        if self._by_key is None:
            self._by_key = {k: i for i, (k, _) in enumerate(self.texts) if k is not None}
        return self._by_key.get(key)

    def members(self) -> np.ndarray:
        """[n_banks, largest bank] entry rows of each bank, −1 padded."""
        if self._members is None:
            order = np.argsort(self.bank, kind="stable")
            size = np.bincount(self.bank, minlength=self.params.n_banks)
            width = max(1, int(size.max()) if len(size) else 1)
            out = np.full((self.params.n_banks, width), -1, np.int64)
            start = np.concatenate([[0], np.cumsum(size)[:-1]])
            slot = np.arange(len(order)) - np.repeat(start, size)
            out[self.bank[order], slot] = order
            self._members = out
        return self._members

    def query(self, key_hv: np.ndarray, probes: int = 8) -> Optional[Hit]:
        """The nearest stored value to key ⊕ bank over the key's `probes` nearest banks."""
        return self.query_many(self._vector(key_hv)[None], probes)[0]

    def query_many(self, keys: np.ndarray, probes: int = 8, chunk: int = 256) -> list:
        """`query` for every key [Q, W] (batched: centroid distances by
        `hypervector.hamming_table`, candidates compared in chunks)."""
        keys = np.atleast_2d(keys)
        if len(self) == 0:
            return [None] * len(keys)
        members, out = self.members(), []
        dim = self.params.dim
        for i in range(0, len(keys), chunk):
            q = keys[i:i + chunk]
            banks = self.bank_of(q, probes, self.key_banks.packed)        # [Q, P]
            unbound = hv.bind(q[:, None, :], self.banks.packed[banks])    # [Q, P, W]
            rows = members[banks]                                         # [Q, P, S]
            vals = self.value_hv[np.maximum(rows, 0)]                     # [Q, P, S, W]
            dist = hv.hamming(unbound[:, :, None, :], vals)
            dist = np.where(rows >= 0, dist, dim + 1).reshape(len(q), -1)
            best = np.argmin(dist, axis=1)
            for j, b in enumerate(best):
                d = int(dist[j, b])
                if d > dim:
                    out.append(None)
                    continue
                p, s = divmod(int(b), rows.shape[2])
                out.append(Hit(int(rows[j, p, s]), 1.0 - d / dim, int(banks[j, p])))
        return out

    def stats(self) -> dict:
        sizes = self.banks.sizes
        w = hv.words(self.params.dim)
        return {"entries": len(self), "dim": self.params.dim, "banks": self.params.n_banks,
                "banks_used": int((sizes > 0).sum()), "largest_bank": int(sizes.max()),
                "mean_bank": float(sizes.mean()), "seed": self.params.seed,
                "bytes_per_vector": w * 8, "vector_bytes": int(len(self) * 2 * w * 8),
                "bank_bytes": int(2 * self.params.n_banks * w * 8)}
