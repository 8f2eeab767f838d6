"""Host tier: expert regions in host memory under a hard byte budget.

Eviction is frequency-weighted LRU: each entry scores

    score = (prior · prior_weight + uses) · 2^(−age / half_life)

where `prior` is the expert's routing frequency recorded at export (so a warm
start keeps the experts calibration text used most), `uses` counts hits since
it was loaded and `age` is the number of lookups since its last use. The entry
with the lowest score goes first. `bytes_held` never exceeds `budget_bytes`:
space is reserved before a region is read (`reserve`), and evicted entries are
released before the new one is admitted. `staging_bytes` is set aside for
read buffers in flight outside the entries (a pinned host tier copies each fresh
read into pinned memory), so the budget covers those too. Pinned entries
(`pin`: each expert layer's hub, the region every expert of the layer has a delta
from, `modeldir.format`) are never evicted.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

import numpy as np


class HostCache:
    def __init__(self, budget_bytes: int, entry_bytes: int,
                 priors: Optional[np.ndarray] = None, prior_weight: float = 8.0,
                 half_life: float = 256.0, place: Callable = lambda a: a,
                 staging_bytes: int = 0):
        if entry_bytes <= 0:
            raise ValueError("entry_bytes must be positive")
        self.budget_bytes, self.entry_bytes = int(budget_bytes), int(entry_bytes)
        self.staging_bytes = int(staging_bytes)
        self.capacity = max(self.budget_bytes - self.staging_bytes, 0) // self.entry_bytes
        self.priors = priors
        self.prior_weight, self.half_life = prior_weight, half_life
        self.place = place                   # numpy region → host array (pinned_host)
        self._entries: dict[tuple[int, int], object] = {}
        self._uses: dict[tuple[int, int], float] = {}
        self._last: dict[tuple[int, int], int] = {}
        self._reserved = 0
        self.pinned: set = set()
        self._tick = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0
        self.peak_bytes = 0

    @property
    def bytes_held(self) -> int:
        """Entries, reserved entries and the staging set aside for buffers in flight."""
        return (len(self._entries) + self._reserved) * self.entry_bytes + self.staging_bytes

    def __contains__(self, key) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _score(self, key) -> float:
        prior = 0.0 if self.priors is None else float(self.priors[key])
        age = self._tick - self._last[key]
        return (prior * self.prior_weight + self._uses[key]) * 2.0 ** (-age / self.half_life)

    def get(self, key):
        """The cached host array for (layer, expert), or None (counted as hit/miss)."""
        with self._lock:
            self._tick += 1
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self.hits += 1
            self._uses[key] += 1
            self._last[key] = self._tick
            return value

    def held(self, keys):
        """(key, host array) of the first of `keys` the cache holds, or None. Counted as
        a use of that entry (it is read from), not as a hit or miss."""
        with self._lock:
            for key in keys:
                value = self._entries.get(key)
                if value is not None:
                    self._tick += 1
                    self._uses[key] += 1
                    self._last[key] = self._tick
                    return key, value
            return None

    def reserve(self, keep=None) -> bool:
        """Make room for one region about to be read, never evicting `keep` (a region
        it is built from); False if the budget holds none."""
        with self._lock:
            if self.capacity == 0:
                return False
            while len(self._entries) + self._reserved >= self.capacity:
                candidates = [k for k in self._entries if k != keep and k not in self.pinned]
                if not candidates:
                    return False
                victim = min(candidates, key=self._score)
                self._drop(victim)
                self.evictions += 1
            self._reserved += 1
            self.peak_bytes = max(self.peak_bytes, self.bytes_held)
            return True

    def unreserve(self) -> None:
        """Give back space reserved for a read that did not complete."""
        with self._lock:
            self._reserved -= 1

    def admit(self, key, region: np.ndarray, reserved: bool):
        """Store a region read into reserved space; returns the host array."""
        try:
            value = self.place(region)
        except BaseException:
            if reserved:
                self.unreserve()
            raise
        with self._lock:
            if not reserved:
                return value                 # not cached: the caller holds it briefly
            self._reserved -= 1
            if key in self._entries:
                return self._entries[key]
            self._entries[key] = value
            self._uses[key] = 0.0
            self._last[key] = self._tick
            self.peak_bytes = max(self.peak_bytes, self.bytes_held)
            return value

    def _drop(self, key) -> None:
        del self._entries[key], self._uses[key], self._last[key]

    def pin(self, key, read: Callable[[int, int], np.ndarray]) -> bool:
        """Hold (layer, expert) `key` for good (read with `read` unless held); False
        when pinning it would leave fewer than half the entries for the rest."""
        if len(self.pinned) + 1 > self.capacity // 2:
            return False
        if key not in self._entries:
            if not self.reserve():
                return False
            self.admit(key, read(*key), reserved=True)
        self.pinned.add(key)
        return True

    def warm(self, read: Callable[[int, int], np.ndarray]) -> int:
        """Fill the cache with the most frequent experts (by prior); returns how many."""
        if self.priors is None:
            return 0
        order = np.argsort(-self.priors, axis=None)[: self.capacity]
        n = 0
        for flat in order:
            key = tuple(int(v) for v in np.unravel_index(flat, self.priors.shape))
            if self.priors[key] <= 0 or not self.reserve():
                break
            self.admit(key, read(*key), reserved=True)
            n += 1
        return n
