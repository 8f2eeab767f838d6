"""The associative memory: banks of key ⊕ value bundles plus the entry store
(SPEC §3.7).

    mem = HDMemory.new(MemoryParams(dim=10_000, n_banks=2000, seed=0))
    i = mem.add(key_hv, value_hv, key="the capital of Zorbin", value="Quartzville")
    hit = mem.query(key_hv, probes=8)       # Hit(row, similarity, bank) or None
    hits = mem.query_many(keys [Q, W], probes=8)

A pair goes to the bank whose seeded centroid is nearest its key (Hamming). Each
bank keeps two bundles (`banks.Banks`): of its bound vectors key ⊕ value, and of its
keys (the bank's index). A query picks its `probes` candidate banks by the
similarity of their key bundles to it (`HDMemory.probe`: a first pass over 1,024 of
the bits, the 64 nearest then in full, every bundle in full unless the best is
clearly found) — a key, exact or with bits flipped, is
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


# The first pass of a query over every bank's key bundle (see `HDMemory.probe`)
PREFILTER_WORDS = 16     # words compared first: 1,024 of the bits
PREFILTER_KEEP = 64      # banks then compared in full (at least 4 × probes)
DECODE_KEEP = 16         # candidate values then compared in full
ACCEPT_Z = 5.5           # σ above chance the best of them needs, else every bank in full
GROWTH = 1.25            # spare rows a single add allocates, as a share of the entries
_DECODE_WORDS = 1 << 22  # words of stored values compared at once in `decode`


class Hit(NamedTuple):
    row: int            # the entry's row in the store
    similarity: float   # 1 − hamming(bank ⊕ query, value) / D
    bank: int


def nearest(dist: np.ndarray, k: int, ids: Optional[np.ndarray] = None,
            ordered: bool = True) -> np.ndarray:
    """Positions [Q, k] of the k smallest of dist [Q, N], nearest first (unless not
    `ordered`); ties go to the smaller id (`ids` [Q, N] or [N], default the
    position), so the choice is the same on every machine."""
    n = dist.shape[1]
    ids = np.arange(n) if ids is None else ids
    scale = int(np.max(ids)) + 1
    dt = np.int32 if (int(dist.max()) + 1) * scale < 2**31 else np.int64   # faster
    key = dist.astype(dt) * dt(scale) + ids.astype(dt)
    if k < n:
        part = np.argpartition(key, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n), key.shape)
    if not ordered:
        return part
    order = np.argsort(np.take_along_axis(key, part, 1), axis=1)
    return np.take_along_axis(part, order, 1)


_COLUMNS = {"key_hv": "key_hv", "value_hv": "value_hv", "bank": "bank", "time": "time",
            "confidence": "confidence", "ids": "id"}      # attribute: memory-file column


def _clear(best: np.ndarray, last: np.ndarray, dim: int) -> np.ndarray:
    """A first pass's answer stands: its full distance `best` [Q] is ACCEPT_Z σ above
    chance (1 − 2·best/D ≥ ACCEPT_Z/√D) and, as a share of D, no more than the rough
    distance `last` [Q] (over PREFILTER_WORDS words) of the farthest candidate kept,
    so nothing left out looked nearer."""
    return (((dim - 2 * best) >= ACCEPT_Z * np.sqrt(dim))
            & (best * (PREFILTER_WORDS * hv.WORD_BITS) <= last * dim))


def _column(name: str):
    def get(self):
        return self._buf[name][:self._n]

    def put(self, value):
        self._buf[name] = np.asarray(value)
        self._n = len(self._buf[name])
    return property(get, put, doc=f"the `{_COLUMNS[name]}` column of the entries")


class HDMemory:
    key_hv, value_hv, bank = _column("key_hv"), _column("value_hv"), _column("bank")
    time, confidence, ids = _column("time"), _column("confidence"), _column("ids")

    def __init__(self, params: MemoryParams, banks: Banks, key_banks: Banks, columns: dict,
                 texts: list, next_id: int):
        self.params, self.banks, self.key_banks = params, banks, key_banks
        # columns live in buffers with spare rows (single adds are amortised O(1))
        self._buf = {attr: np.asarray(columns[col]) for attr, col in _COLUMNS.items()}
        self._n = len(self._buf["bank"])
        self.texts = texts                         # [(key text | None, value text | None)]
        self.next_id = next_id
        self.centroids = hv.random(seeded(params.seed, 0), params.n_banks, params.dim)
        self._members = None                       # [n_banks, max size] rows, -1 padded
        self._by_key = None
        self._rough = None                         # key bundles' first words [words, B]

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
        return self._n

    # ------------------------------------------------------------------ writing
    def bank_of(self, keys: np.ndarray, probes: int = 1, index=None) -> np.ndarray:
        """The `probes` banks nearest each key [Q, W] → [Q, probes] (nearest first, ties
        to the lower bank), by `index` [n_banks, W]: the centroids (where a pair is
        stored) by default."""
        dist = hv.hamming_table(keys, self.centroids if index is None else index)
        return nearest(dist, min(probes, self.params.n_banks))

    def _bound_of(self, bank: int) -> np.ndarray:
        rows = np.flatnonzero(self.bank == bank)
        return hv.bind(self.key_hv[rows], self.value_hv[rows])

    def _keys_of(self, bank: int) -> np.ndarray:
        return self.key_hv[np.flatnonzero(self.bank == bank)]

    def _append(self, values: dict) -> None:
        """Append rows (attribute → [k, ...]) into the column buffers, growing them by
        GROWTH × the entries when full."""
        k = len(values["bank"])
        need = self._n + k
        for name, new in values.items():
            buf = self._buf[name]
            if len(buf) < need:
                cap = max(need, int(self._n * GROWTH) + 64)
                grown = np.empty((cap, *buf.shape[1:]), buf.dtype)
                grown[:self._n] = buf[:self._n]
                self._buf[name] = buf = grown
            buf[self._n:need] = new
        self._n = need

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
        row = self._n
        self._append({"key_hv": key_hv[None], "value_hv": value_hv[None],
                      "bank": np.array([bank], np.int32),
                      "time": np.array([time.time() if timestamp is None else timestamp]),
                      "confidence": np.array([confidence], np.float32),
                      "ids": np.array([self.next_id], np.int64)})
        self.texts.append((key, value))
        self.next_id += 1
        if self._by_key is not None and key is not None:
            self._by_key[key] = row
        if self._rough is not None:
            self._rough[:, bank] = self.key_banks.packed[bank, :len(self._rough)]
        if self._members is not None:              # the new row ends its bank's list
            slot = int(self.banks.sizes[bank]) - 1
            if slot >= self._members.shape[1]:
                self._members = np.pad(self._members, ((0, 0), (0, 1)), constant_values=-1)
            self._members[bank, slot] = row
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
        self._append({"key_hv": key_hvs, "value_hv": value_hvs, "bank": banks,
                      "time": np.full(n, time.time()),
                      "confidence": np.full(n, confidence, np.float32),
                      "ids": self.next_id + np.arange(n, dtype=np.int64)})
        self.texts.extend(zip(keys, values))
        self.next_id += n
        self.rebuild_banks()

    def remove_rows(self, rows) -> None:
        """Take entries (by row) out of the store and their banks."""
        rows = sorted({int(r) for r in rows})
        for r in rows:
            # a bank's counters are built (once) from its rows before any leaves it
            bank = int(self.bank[r])
            self.banks.remove(bank, hv.bind(self.key_hv[r], self.value_hv[r]), self._bound_of)
            self.key_banks.remove(bank, self.key_hv[r], self._keys_of)
        for name in _COLUMNS:                    # new arrays: views handed out still hold
            self._buf[name] = np.delete(self._buf[name][:self._n], rows, axis=0)
        self._n -= len(rows)
        for r in reversed(rows):
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
        self._members, self._by_key, self._rough = None, None, None

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
        """[n_banks, largest bank] entry rows of each bank (ascending), −1 padded."""
        if self._members is None:
            bank = self.bank
            order = np.argsort(bank, kind="stable")
            size = np.bincount(bank, minlength=self.params.n_banks)
            width = max(1, int(size.max()) if len(size) else 1)
            out = np.full((self.params.n_banks, width), -1, np.int64)
            start = np.concatenate([[0], np.cumsum(size)[:-1]])
            slot = np.arange(len(order)) - np.repeat(start, size)
            out[bank[order], slot] = order
            self._members = out
        return self._members

    def probe(self, keys: np.ndarray, probes: int = 8) -> np.ndarray:
        """The `probes` banks whose key bundles are nearest each key [Q, W] → [Q, P]
        (nearest first, ties to the lower bank, empty banks after every used one).

        First pass: the distances over the first PREFILTER_WORDS words of every
        bundle (a random sample of the bits); the PREFILTER_KEEP nearest are then
        compared in full. That answer stands when it is `_clear` (its best bank
        ACCEPT_Z σ above chance and nearer than the rough distance of any bank left
        out suggests); otherwise (misses, heavy noise at heavy load) every bundle is
        compared in full, as without the first pass."""
        return self._probe(keys, probes)[0]

    def _probe(self, keys: np.ndarray, probes: int):
        """`probe` → (banks [Q, P], clear [Q]: the first pass's answer stood)."""
        kb = self.key_banks.packed
        n_banks, w = kb.shape
        dim = self.params.dim
        probes = min(probes, n_banks)
        keep = min(n_banks, max(PREFILTER_KEEP, 4 * probes))
        away = np.where(self.key_banks.sizes > 0, 0, 2 * dim + 2)   # empty banks: last
        if w < 4 * PREFILTER_WORDS or 2 * keep > n_banks:
            return nearest(hv.hamming_table(keys, kb) + away, probes), np.zeros(len(keys), bool)
        if self._rough is None:                   # word-major: kept for the NumPy path
            self._rough = np.ascontiguousarray(kb[:, :PREFILTER_WORDS].T)
        rough = hv.hamming_table(keys[:, :PREFILTER_WORDS], kb[:, :PREFILTER_WORDS],
                                 xt=self._rough) + away
        cand = nearest(rough, keep, ordered=False)                   # [Q, keep]
        exact = hv.hamming(keys[:, None, :], kb[cand]) + away[cand]   # [Q, keep]
        last = np.take_along_axis(rough, cand, 1).max(axis=1)        # the farthest kept
        ok = _clear(exact.min(axis=1), last, dim)
        banks = np.empty((len(keys), probes), np.int64)
        if ok.any():
            good = np.flatnonzero(ok)
            banks[good] = np.take_along_axis(cand[good], nearest(exact[good], probes,
                                                                 cand[good]), 1)
        if not ok.all():                        # every bundle in full
            redo = np.flatnonzero(~ok)
            banks[redo] = nearest(hv.hamming_table(keys[redo], kb) + away, probes)
        return banks, ok

    def query(self, key_hv: np.ndarray, probes: int = 8) -> Optional[Hit]:
        """The nearest stored value to key ⊕ bank over the key's `probes` nearest banks."""
        return self.query_many(self._vector(key_hv)[None], probes)[0]

    def query_many(self, keys: np.ndarray, probes: int = 8, chunk: int = 256) -> list:
        """`query` for every key [Q, W]: candidate banks by `probe`, then `decode`
        (`chunk` keys at a time; a key whose bank was not clearly found skips the
        decoding's first pass)."""
        keys = np.atleast_2d(keys)
        if len(self) == 0:
            return [None] * len(keys)
        out = []
        for i in range(0, len(keys), chunk):
            q = keys[i:i + chunk]
            banks, clear = self._probe(q, probes)
            out.extend(self.decode(q, banks, clear))
        return out

    def decode(self, keys: np.ndarray, banks: np.ndarray, first_pass=None) -> list:
        """For each key [Q, W] and its candidate banks [Q, P]: the stored value of
        those banks nearest bank ⊕ key (ties to the earlier bank, then row) → Hit or
        None. As in `probe`, for the keys `first_pass` [Q] marks (default all): first
        over PREFILTER_WORDS words of every candidate value, the DECODE_KEEP nearest
        then in full, standing when `_clear`; the rest in full."""
        dim, w = self.params.dim, keys.shape[1]
        rows = self.members()[banks].reshape(len(keys), -1)             # [Q, M]
        n_m = rows.shape[1]
        probe_of = np.arange(n_m) // (n_m // banks.shape[1])            # [M] slot → probe
        unbound = hv.bind(keys[:, None, :], self.banks.packed[banks])   # [Q, P, W]
        away = np.where(rows >= 0, 0, 2 * dim + 2)                      # padding: never
        safe = np.maximum(rows, 0)
        pos = np.zeros(len(keys), np.int64)
        dist = np.full(len(keys), 2 * dim + 2, np.int64)
        redo = np.arange(len(keys))
        keep, pw = DECODE_KEEP, PREFILTER_WORDS
        tries = redo if first_pass is None else np.flatnonzero(first_pass)
        if n_m > 2 * keep and w >= 4 * pw and len(tries):
            t = tries[:, None]
            rough = hv.hamming(unbound[t, probe_of, :pw], self.value_hv[:, :pw][safe[tries]])
            rough += away[tries]
            cand = nearest(rough, keep, ordered=False)                   # [T, K] slots
            exact = hv.hamming(unbound[t, probe_of[cand]], self.value_hv[safe[t, cand]])
            exact += away[t, cand]
            col = nearest(exact, 1, cand)
            pos[tries] = np.take_along_axis(cand, col, 1)[:, 0]
            dist[tries] = np.take_along_axis(exact, col, 1)[:, 0]
            ok = np.zeros(len(keys), bool)
            ok[tries] = _clear(dist[tries], np.take_along_axis(rough, cand, 1).max(axis=1), dim)
            redo = np.flatnonzero(~ok)
        step = max(1, _DECODE_WORDS // (n_m * w))                      # bound the temps
        for j in range(0, len(redo), step):                             # all in full
            r = redo[j:j + step]
            vals = self.value_hv[safe[r]].reshape(len(r), *banks.shape[1:], -1, w)
            full = hv.hamming(unbound[r][:, :, None, :], vals).reshape(len(r), n_m) + away[r]
            pos[r] = np.argmin(full, axis=1)
            dist[r] = full[np.arange(len(r)), pos[r]]
        return [None if d > dim else
                Hit(int(rows[k, p]), 1.0 - int(d) / dim, int(banks[k, probe_of[p]]))
                for k, (p, d) in enumerate(zip(pos, dist))]

    def stats(self) -> dict:
        sizes = self.banks.sizes
        w = hv.words(self.params.dim)
        return {"entries": len(self), "dim": self.params.dim, "banks": self.params.n_banks,
                "banks_used": int((sizes > 0).sum()), "largest_bank": int(sizes.max()),
                "mean_bank": float(sizes.mean()), "seed": self.params.seed,
                "bytes_per_vector": w * 8, "vector_bytes": int(len(self) * 2 * w * 8),
                "bank_bytes": int(2 * self.params.n_banks * w * 8)}
