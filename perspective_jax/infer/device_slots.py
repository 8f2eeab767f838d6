"""Device tier: a fixed set of expert-layer slots (two = the double buffer).

Each slot holds the packed region of one (expert layer, expert) on the
accelerator (memory kind "device"). A slot can be refilled by a full transfer
from host memory or, when it holds a lattice neighbour of the wanted expert of
the same layer, rewritten in place by a byte delta (one scatter). The slot the
current layer computes with is protected from reuse; otherwise the least
recently used slot is refilled.

The device never holds more than `n_slots` regions: a full transfer drops the
slot's old region before the new one is allocated, and a delta rewrites the slot
in place (its buffer is donated). `regions_peak` counts the regions actually
alive (weak references; a donated buffer is not counted), so tests check this
rather than derive it.
"""

from __future__ import annotations

import functools
import weakref
from typing import Optional

import jax
import numpy as np


def memory_sharding(device, kind: str):
    """SingleDeviceSharding on `device` in memory kind `kind` (if the backend has it)."""
    kinds = {m.kind for m in device.addressable_memories()}
    if kind in kinds:
        return jax.sharding.SingleDeviceSharding(device, memory_kind=kind)
    return jax.sharding.SingleDeviceSharding(device)


@functools.partial(jax.jit, donate_argnums=(0,))
def _scatter(region, positions, values):
    return region.at[positions].set(values)


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class DeviceSlots:
    def __init__(self, n_slots: int, region_bytes: int, device):
        if n_slots < 2:
            raise ValueError("the device tier needs at least 2 slots (double buffer)")
        self.n_slots, self.region_bytes = n_slots, region_bytes
        self.sharding = memory_sharding(device, "device")
        self.keys: list[Optional[tuple[int, int]]] = [None] * n_slots
        self.arrays: list[Optional[jax.Array]] = [None] * n_slots
        self._last = [0] * n_slots
        self._tick = 0
        self._placed: list[weakref.ref] = []    # every region array put in a slot
        self._fences: list[Optional[jax.Array]] = [None] * n_slots
        self.regions_peak = 0

    @property
    def bytes_held(self) -> int:
        return sum(self.region_bytes for a in self.arrays if a is not None)

    def find(self, key) -> Optional[int]:
        """Slot holding `key`, or None (one pass over a snapshot: safe while another
        thread rewrites a slot)."""
        for slot, k in enumerate(list(self.keys)):
            if k == key:
                return slot
        return None

    def touch(self, slot: int) -> None:
        self._tick += 1
        self._last[slot] = self._tick

    def victim(self, protect=()) -> int:
        free = [s for s in range(self.n_slots) if s not in protect]
        empty = [s for s in free if self.keys[s] is None]
        return empty[0] if empty else min(free, key=lambda s: self._last[s])

    def delta_slot(self, layer: int, sources, protect=()) -> Optional[int]:
        """A reusable slot holding one of `sources` (experts of `layer`), if any."""
        for s in range(self.n_slots):
            if s not in protect and self.keys[s] is not None and \
                    self.keys[s][0] == layer and self.keys[s][1] in sources:
                return s
        return None

    def _note_live(self, array: jax.Array) -> None:
        """Count the region arrays alive on the device now that `array` exists."""
        self._placed = [r for r in self._placed
                        if (a := r()) is not None and not a.is_deleted()]
        self._placed.append(weakref.ref(array))
        self.regions_peak = max(self.regions_peak, len(self._placed))

    def fence(self, slot: int, done: jax.Array) -> None:
        """`done` becomes ready when the last computation reading `slot` has run; a
        refill of the slot waits for it (prefill dispatches experts without waiting;
        a decode step's computations have all run by its next route)."""
        self._fences[slot] = done

    def load(self, slot: int, key, host_region) -> None:
        """Full transfer host → device into `slot` (asynchronous; returns at once). The
        slot's old region is freed first — after the computations reading it (its
        fence) — so the device holds at most `n_slots` regions."""
        fence, self._fences[slot] = self._fences[slot], None
        if fence is not None:
            fence.block_until_ready()
        self.keys[slot] = None                  # never found while it has no array
        self.arrays[slot] = None
        array = jax.device_put(host_region, self.sharding)
        self._note_live(array)
        self.arrays[slot] = array
        self.keys[slot] = key
        self.touch(slot)

    def apply_delta(self, slot: int, key, positions: np.ndarray, values: np.ndarray) -> None:
        """Rewrite `slot` in place with a byte delta (padded to a power-of-two length
        by repeating the first entry, so few shapes are compiled)."""
        n = len(positions)
        size = _bucket(max(n, 1))
        pos = np.full(size, positions[0] if n else 0, np.int32)
        val = np.full(size, values[0] if n else 0, np.uint8)
        if n:
            pos[:n], val[:n] = positions, values
        else:                                   # identical regions: rewrite byte 0 as is
            val[:] = np.asarray(self.arrays[slot][:1])[0]
        self.keys[slot] = None
        array = _scatter(self.arrays[slot], jax.device_put(pos, self.sharding),
                         jax.device_put(val, self.sharding))
        self._note_live(array)
        self.arrays[slot] = array
        self.keys[slot] = key
        self.touch(slot)
