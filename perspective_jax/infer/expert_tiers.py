"""Expert regions through the tiers: disk → host cache → device slots (SPEC §3.5).

    tiers = ExpertTiers(store, host, slots, stats, ...)
    slot = tiers.ensure((j, e), then=(j + 1, guess))   # decode: layer j's expert
    slot = tiers.ensure((j, e))                         # prefill, or no guess

`ensure` returns the device slot holding `key`. Every change to the slots made
while a prefetch may be in flight runs on one I/O thread, in the order it was
asked for, so at layer j the engine can queue layer j+1's guessed expert right
behind layer j's own region *before* waiting for it: the disk reads the guess as
soon as layer j's region is in, instead of after layer j has been waited for,
routed and synchronised (the old order). The guess's transfer protects layer j's
slot by key (resolved when it runs, after layer j's region is placed).

Per layer the wanted expert is served by, in order: a slot already holding it
("same"), a slot holding a lattice neighbour with an exported delta ("delta":
the changed bytes are scattered in place), or a full region transfer of a host
region — a host-cache hit ("full", no disk read), else, when the host cache holds
a lattice neighbour with an exported delta, the region built on the host from it
and the delta read from disk ("host_delta": checked against the expert's region
checksum, admitted to the host cache like a fresh read), else a disk read ("full").
Each bring reports its disk bytes and host→device bytes (`Stats.count_bytes`).
A wrong guess costs a stall and its bytes are counted as wasted, never a wrong
result; with `cancel_wrong_reads` a
wrong guess still reading is stopped between its 1 MiB pieces. A wrong guess
whose read fails (a corrupt or unreadable region that turned out not to be
needed) is counted, not raised: decode goes on, and the error is raised, naming
the file and expert, if and when that expert is actually used.

With `transfer_thread` each bring is split in two: the I/O thread reads the
region (skipped only when every earlier bring has been placed and a slot holds
the expert or a neighbour to take a delta from) and a transfer thread places it
— deciding same / delta / full against the slots as they then are, in the same
FIFO order — so the disk can read the next region while the previous one is
copied to the device.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import weakref
from typing import NamedTuple, Optional

from perspective_jax.infer.device_slots import DeviceSlots
from perspective_jax.infer.expert_store import ExpertStore, ReadCancelled
from perspective_jax.infer.host_cache import HostCache
from perspective_jax.modeldir.format import ModelDirError

# fresh reads waiting to be pinned into the host cache (each holds one read buffer)
MAX_QUEUED_ADMISSIONS = 2

# errors of a region read: a guess that was not needed after all may fail with
# these without stopping decode (anything else is a bug and is raised)
READ_ERRORS = (ModelDirError, OSError)


class Prefetch(NamedTuple):
    """The prefetch in flight: the (layer, expert) guessed, the future of its `_bring`
    and the event that cancels its disk read (None when cancelling is off or a slot
    already holds it)."""

    key: tuple[int, int]
    future: concurrent.futures.Future
    cancel: Optional[threading.Event]


class Fetched(NamedTuple):
    """A host region to transfer, how it was got — "full" (a host-cache hit or a disk
    read) or "host_delta" — and the bytes read from disk for it."""

    region: object
    kind: str
    disk: int


class ExpertTiers:
    """Owns the I/O, transfer (optional) and admit threads that move regions between
    `store`, `host` and `slots`; counts transfers, bytes, stalls and guesses into
    `stats` (the engine's `Stats`). Read buffers it may hold outside the host
    cache's entries at once: `buffers_in_flight(...)`. `stage_in_place`: the host
    tier is plain numpy (CPU backend), so a fresh read is admitted as is; otherwise
    it is sent to the device from its read buffer while the admit thread pins a
    copy for the host cache, unless `pin_before_transfer`."""

    def __init__(self, store: ExpertStore, host: HostCache, slots: DeviceSlots, stats,
                 stage_in_place: bool, use_deltas: bool = True,
                 pin_before_transfer: bool = False, cancel_wrong_reads: bool = False,
                 transfer_thread: bool = False):
        self.store, self.host, self.slots, self.stats = store, host, slots, stats
        self.stage_in_place, self.use_deltas = stage_in_place, use_deltas
        self.pin_before_transfer = pin_before_transfer
        self.cancel_wrong_reads = cancel_wrong_reads
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._transfer = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="transfer")
                          if transfer_thread else None)
        self._admit_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="admit")
        self._admit_futures: list[concurrent.futures.Future] = []
        self._admit_lock = threading.Lock()
        self._pending: Optional[Prefetch] = None
        self._submitted = 0                   # brings queued so far (transfer thread:
        self._placed = 0                      # and how many of them it has placed)
        # read buffers alive outside the host cache's entries, counted from just before
        # a read allocates one until the last reference to it is gone (weakref), so
        # the share the host budget actually sets aside for them is checked
        self.buffers_budgeted = host.staging_bytes // store.alloc_bytes
        self.buffers_alive = self.buffers_peak = 0
        self._buffers_lock = threading.Lock()

    @staticmethod
    def buffers_in_flight(stage_in_place: bool, pin_before_transfer: bool,
                          transfer_thread: bool) -> int:
        """Read buffers held outside the host cache's entries at most: none when the
        host tier is the read buffers themselves (numpy); else the one being read,
        plus those queued for pinning (unless pinned before their transfer), plus,
        with a transfer thread, two read but not yet placed (a guess being placed
        and the next region waiting; their reads may not have been admitted)."""
        if stage_in_place:
            return 0
        queued = 0 if pin_before_transfer else MAX_QUEUED_ADMISSIONS
        return 1 + queued + (2 if transfer_thread else 0)

    # ------------------------------------------------------------- host tier
    def host_region(self, key, cancel: Optional[threading.Event] = None):
        """Host array to transfer (layer, expert) from (`_fetch`)."""
        return self._fetch(key, cancel).region

    def _fetch(self, key, cancel: Optional[threading.Event] = None) -> Fetched:
        """The host cache's region of `key`, else one built by a host delta, else a
        fresh read from disk."""
        value = self.host.get(key)
        if value is not None:
            return Fetched(value, "full", 0)
        built = self._host_delta(key) if self.use_deltas else None
        if built is not None:
            return built
        return Fetched(self._read(key, cancel), "full", self.store.region_bytes)

    def _read(self, key, cancel: Optional[threading.Event] = None):
        """A fresh read from disk. With a pinned host tier the fresh region goes to the
        device straight from the read buffer, and its pinned copy is made for the cache
        on the admit thread afterwards — the staging copy is off the critical path."""
        reserved = self.host.reserve()
        outside = not (self.stage_in_place and reserved)    # not read into a cache entry
        if outside:
            self._buffer_opened()
        try:
            region = self.store.read_region(*key, cancel=cancel)
        except BaseException:                 # cancelled, corrupt, unreadable
            if outside:
                self._buffer_closed()
            if reserved:
                self.host.unreserve()
            raise
        if outside:
            weakref.finalize(region, self._buffer_closed)
        return self._admit_fresh(key, region, reserved)

    def _host_delta(self, key) -> Optional[Fetched]:
        """`key`'s region built from a lattice neighbour the host cache holds and the
        delta read from disk, admitted to the host cache; None when the cache holds no
        such neighbour, could make room only by evicting it, or the delta is damaged
        (recorded in `stats.damaged_deltas`; the caller reads the region in full).
        The new region takes the place of a fresh read's buffer."""
        j, e = key
        sources = self.store.delta_sources(j, e)
        held = self.host.held([(j, s) for s in sources]) if sources else None
        if held is None:
            return None
        (_, src), base = held
        if not self.host.reserve(keep=(j, src)):
            return None
        nbytes = self.store.delta_bytes(j, src, e)
        outside = not self.stage_in_place
        if outside:
            self._buffer_opened()
        try:
            region = self.store.region_from_delta(base, j, src, e)
        except BaseException as err:
            if outside:
                self._buffer_closed()
            self.host.unreserve()
            if not isinstance(err, ModelDirError):
                raise
            self._damaged_delta(err, j, src, e)
            return None
        del base
        if outside:
            weakref.finalize(region, self._buffer_closed)
        return Fetched(self._admit_fresh(key, region, True), "host_delta", nbytes)

    def _damaged_delta(self, err, j: int, src: int, e: int) -> None:
        """A delta is only a shortcut: forget it, say so, load its target in full."""
        self.store.drop_delta(j, src, e)
        self.stats.damaged_deltas.append(f"{err} (expert {e} of expert layer {j} is loaded "
                                         "in full instead)")

    def _admit_fresh(self, key, region, reserved: bool):
        """A fresh region (read or built) into the host cache (if `reserved`); returns
        the host array to transfer from."""
        if self.stage_in_place or self.pin_before_transfer:
            return self.host.admit(key, region, reserved)
        if reserved:
            try:
                self._queue_admission(key, region)
            except BaseException:             # an earlier admission failed
                self.host.unreserve()
                raise
        return region

    def _buffer_opened(self) -> None:
        with self._buffers_lock:
            self.buffers_alive += 1
            self.buffers_peak = max(self.buffers_peak, self.buffers_alive)

    def _buffer_closed(self) -> None:
        with self._buffers_lock:
            self.buffers_alive -= 1

    def _queue_admission(self, key, region) -> None:
        """Pin `region` into the host cache on the admit thread. At most
        `MAX_QUEUED_ADMISSIONS` read buffers wait for it (beyond that the oldest is
        waited for: backpressure, so the buffers stay inside the budget's staging)."""
        with self._admit_lock:
            done = [f for f in self._admit_futures if f.done()]
            for f in done:
                self._admit_futures.remove(f)
            for f in done:
                f.result()                    # a failed admission surfaces here, once
            if len(self._admit_futures) >= MAX_QUEUED_ADMISSIONS:
                self._admit_futures.pop(0).result()
            self._admit_futures.append(self._admit_pool.submit(self._admit, key, region))

    def _admit(self, key, region) -> None:
        self.host.admit(key, region, reserved=True)   # returns nothing: no array outlives
                                                      # its eviction through a future

    # ----------------------------------------------------------- device tier
    def _submit_bring(self, key, protect_keys=(), cancel: Optional[threading.Event] = None
                      ) -> concurrent.futures.Future:
        """Queue `_bring(key)` behind everything asked before (FIFO); returns its future."""
        if self._transfer is None:
            return self._io.submit(self._bring, key, protect_keys, cancel)
        self._submitted += 1
        read = self._io.submit(self._read_ahead, key, cancel, self._submitted)
        return self._transfer.submit(self._place, key, read, protect_keys, cancel)

    def _read_ahead(self, key, cancel, seq: int) -> Optional[Fetched]:
        """I/O thread: the host region of `key` (bring number `seq`), or None when
        every earlier bring has been placed (the slots are final for it) and a slot
        holds `key` or a neighbour to take a delta from."""
        if self._placed == seq - 1 and (self.slots.find(key) is not None
                                        or self._delta_slot(key, ()) is not None):
            return None
        return self._fetch(key, cancel)

    def _place(self, key, read: concurrent.futures.Future, protect_keys, cancel):
        """Transfer thread: `_bring(key)` with the region the I/O thread read (a
        guess cancelled meanwhile is not placed)."""
        try:
            fetched = read.result()
            if cancel is not None and cancel.is_set():
                return "cancelled", 0, fetched.disk if fetched is not None else 0
            return self._bring(key, protect_keys, cancel, fetched=fetched)
        except ReadCancelled:
            return "cancelled", 0, 0
        finally:
            self._placed += 1                 # only this thread writes it

    def _delta_slot(self, key, protect) -> Optional[int]:
        if not self.use_deltas:
            return None
        sources = self.store.delta_sources(*key)
        return self.slots.delta_slot(key[0], sources, protect) if sources else None

    def _bring(self, key, protect_keys=(), cancel: Optional[threading.Event] = None,
               fetched: Optional[Fetched] = None) -> tuple[str, int, int]:
        """Make `key` resident in a slot that holds none of `protect_keys` (`fetched`:
        its host region if already got); returns (transfer kind, host→device bytes,
        disk bytes), or ("cancelled", 0, 0) when `cancel` was set while its region was
        read from disk. A region got ahead but not needed still counts its disk bytes."""
        spent = fetched.disk if fetched is not None else 0
        slot = self.slots.find(key)
        if slot is not None:
            self.slots.touch(slot)
            return "same", 0, spent
        protect = tuple(s for s, k in enumerate(self.slots.keys) if k in protect_keys)
        j, e = key
        slot = self._delta_slot(key, protect)
        if slot is not None:
            src = self.slots.keys[slot][1]
            nbytes = self.store.delta_bytes(j, src, e)
            try:
                positions, values = self.store.read_delta(j, src, e)
            except ModelDirError as err:
                self._damaged_delta(err, j, src, e)
            else:
                self.slots.apply_delta(slot, key, positions, values)
                self.slots.arrays[slot].block_until_ready()
                return "delta", 5 * len(positions), spent + nbytes
        if fetched is None:
            try:
                fetched = self._fetch(key, cancel)
            except ReadCancelled:
                return "cancelled", 0, 0
        slot = self.slots.victim(protect)
        self.slots.load(slot, key, fetched.region)
        self.slots.arrays[slot].block_until_ready()
        return fetched.kind, self.slots.region_bytes, fetched.disk

    def ensure(self, key, then=None) -> int:
        """Slot holding `key` now; `then`, if given, is the guess for the next layer,
        queued behind `key` on the I/O thread before waiting (its bring protects
        `key`'s slot). Time spent waiting — for a right guess still in flight, for a
        wrong guess to finish, or for a load — is a stall."""
        stats = self.stats
        t0 = time.perf_counter()
        pending, self._pending = self._pending, None
        idle = pending is None or pending.future.done()     # nothing runs on the I/O thread
        right = pending is not None and pending.key == key
        if pending is not None and not right and not idle and self.cancel_wrong_reads \
                and pending.cancel is not None:
            pending.cancel.set()                 # wrong guess still reading: stop it
        if right:
            future = pending.future
        elif idle and self.slots.find(key) is not None:
            self.slots.touch(self.slots.find(key))
            future = _done(("same", 0, 0))
        else:                                    # queued behind any wrong guess (FIFO)
            future = self._submit_bring(key)
        if then is not None:
            self._start_prefetch(then, key, io_idle=future.done())
        stalled = not future.done()
        kind, to_device, disk = future.result()  # re-raises a failed read or transfer
        if pending is not None and not right:
            wrong_kind, wrong_device, wrong_disk = self._guess_outcome(pending)   # done:
            stats.cancelled += wrong_kind == "cancelled"                           # it ran first
            stats.count_bytes("wasted", wrong_device, wrong_disk)
        stats.predicted_right += right
        stats.transfers[kind] += 1
        stats.count_bytes(kind, to_device, disk)
        if stalled:
            stats.stalls += 1
            stats.stall_s += time.perf_counter() - t0
        return self.slots.find(key)

    def pending(self) -> bool:
        """Whether a guess is in flight (queued by `ensure`'s `then=` or `prefetch`)."""
        return self._pending is not None

    def prefetch(self, key, protect_key) -> bool:
        """Queue `key` as a guess behind everything asked so far (as `ensure`'s `then=`
        does), keeping `protect_key`'s slot; False (nothing queued) while another
        guess is pending. The engine's next-token layer-0 guess comes this way."""
        if self._pending is not None:
            return False
        self._start_prefetch(key, protect_key, io_idle=False)
        return True

    def _start_prefetch(self, key, protect_key, io_idle: bool) -> None:
        self.stats.predictions += 1
        if io_idle and self.slots.find(key) is not None:    # resident: nothing to bring
            self._pending = Prefetch(key, _done(("same", 0, 0)), None)
            return
        cancel = threading.Event() if self.cancel_wrong_reads else None   # None: one copy
        self._pending = Prefetch(key, self._submit_bring(key, (protect_key,), cancel), cancel)

    def _guess_outcome(self, pending: Prefetch) -> tuple[str, int, int]:
        """(kind, host→device bytes, disk bytes) of a guess that was not used; a read
        error of it is counted (`stats.failed_guesses`), not raised — it is raised
        when the expert is used."""
        try:
            return pending.future.result()
        except READ_ERRORS:
            self.stats.failed_guesses += 1
            return "failed", 0, 0

    # -------------------------------------------------------------- shutdown
    def flush_admissions(self) -> None:
        """Wait until every queued fresh read is pinned into the host cache."""
        self._admit_pool.submit(lambda: None).result()

    def close(self) -> None:
        """Stop the threads (a cancellable read in flight is cancelled); re-raises a
        failed host-cache admission (a failed read of the last, unused guess is only
        counted)."""
        try:
            if self._pending is not None:
                pending, self._pending = self._pending, None
                if pending.cancel is not None:
                    pending.cancel.set()
                self._guess_outcome(pending)
        finally:
            self._io.shutdown(wait=True)
            if self._transfer is not None:
                self._transfer.shutdown(wait=True)
            self._admit_pool.shutdown(wait=True)
            futures, self._admit_futures = self._admit_futures, []
            for f in futures:
                f.result()


def _done(value) -> concurrent.futures.Future:
    f: concurrent.futures.Future = concurrent.futures.Future()
    f.set_result(value)
    return f
