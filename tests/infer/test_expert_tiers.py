"""Expert tiers (disk → host → device slots): the order regions are brought in,
pinned-host admission, read buffers inside the budget, wrong guesses."""

import time

import jax
import numpy as np
import pytest

from perspective_jax.infer import expert_tiers
from perspective_jax.infer import compute as L
from perspective_jax.modeldir import format as md
from perspective_jax.infer.device_slots import DeviceSlots
from perspective_jax.infer.engine import StreamingEngine, Stats
from perspective_jax.infer.options import EngineOptions
from perspective_jax.infer.expert_store import ReadCancelled
from perspective_jax.infer.host_cache import HostCache
from streaming_helpers import assert_engine_matches, reference_logits

REGION = 4096


class SlowStore:
    """A stand-in `ExpertStore`: region (j, e) is REGION bytes of value 16·j + e, read
    in `pieces` steps of `delay` seconds each (a set `cancel` stops it between
    pieces); records the order of reads. No deltas."""

    region_bytes = alloc_bytes = REGION

    def __init__(self, delay=0.02, pieces=4):
        self.delay, self.pieces, self.reads, self.finished = delay, pieces, [], []
        self.corrupt = set()          # keys whose read fails as a corrupt region's does

    def delta_sources(self, j, e):
        return []

    def read_region(self, j, e, cancel=None):
        self.reads.append((j, e))
        for _ in range(self.pieces):
            if cancel is not None and cancel.is_set():
                raise ReadCancelled(f"({j}, {e})")
            time.sleep(self.delay)
        if (j, e) in self.corrupt:
            raise md.ModelDirError(f"experts-{j}.bin: expert {e} of expert layer {j} fails "
                                   "its checksum")
        self.finished.append((j, e))
        return np.full(REGION, 16 * j + e, np.uint8)


def _tiers(store, cancel=False, transfer_thread=False, host_regions=8):
    stats = Stats()
    tiers = expert_tiers.ExpertTiers(
        store, HostCache(host_regions * REGION, REGION), DeviceSlots(2, REGION, jax.devices()[0]),
        stats, stage_in_place=True, use_deltas=False, cancel_wrong_reads=cancel,
        transfer_thread=transfer_thread)
    return tiers, stats


both_threadings = pytest.mark.parametrize("transfer_thread", [False, True],
                                          ids=["io-thread", "transfer-thread"])


def _held(tiers, key):
    slot = tiers.slots.find(key)
    return slot is not None and int(np.asarray(tiers.slots.arrays[slot])[0]) == 16 * key[0] + key[1]


@both_threadings
def test_a_wrong_guess_is_waited_out_then_the_right_region_and_the_next_guess_follow(
        transfer_thread):
    store = SlowStore()
    tiers, stats = _tiers(store, transfer_thread=transfer_thread)
    assert _held(tiers, (0, 1)) is False
    tiers.ensure((0, 1), then=(1, 5))                  # cold start, then guess layer 1: 5
    assert _held(tiers, (0, 1))
    slot = tiers.ensure((1, 3), then=(2, 7))           # wrong guess; next guess queued
    assert tiers.slots.keys[slot] == (1, 3) and _held(tiers, (1, 3))
    tiers.ensure((2, 7))                               # right guess
    tiers.close()
    assert store.reads == [(0, 1), (1, 5), (1, 3), (2, 7)]   # FIFO: guess, fix, next guess
    assert stats.predictions == 2 and stats.predicted_right == 1
    assert stats.transfers["full"] == 3 and stats.bytes_moved["full"] == 3 * REGION
    assert stats.bytes_moved["wasted"] == REGION and stats.stalls >= 2
    assert _held(tiers, (2, 7)) and _held(tiers, (1, 3))   # (2, 7) spared layer 1's slot


@both_threadings
def test_the_next_guess_is_read_while_the_current_region_is_still_awaited(transfer_thread):
    """The guess for layer j+1 is queued before the engine waits for layer j's region,
    so the disk reads it right behind (not after a wait, a route and a sync)."""
    store = SlowStore(delay=0.03)
    tiers, stats = _tiers(store, transfer_thread=transfer_thread)
    finished_at_submit = []
    submit = tiers._io.submit
    tiers._io.submit = lambda fn, key, *a: (finished_at_submit.append((key, len(store.finished))),
                                            submit(fn, key, *a))[1]
    tiers.ensure((0, 0), then=(1, 1))
    assert tiers._pending.key == (1, 1)
    tiers.ensure((1, 1), then=(2, 2))
    tiers.ensure((2, 2))
    tiers.close()
    # each guess was queued before the region it follows had finished reading
    assert finished_at_submit == [((0, 0), 0), ((1, 1), 0), ((2, 2), 1)]
    assert store.reads == [(0, 0), (1, 1), (2, 2)] and stats.predicted_right == 2


@both_threadings
def test_a_wrong_guess_still_reading_is_cancelled_between_pieces(transfer_thread):
    store = SlowStore(delay=0.05, pieces=8)
    tiers, stats = _tiers(store, cancel=True, transfer_thread=transfer_thread)
    tiers.ensure((0, 0), then=(1, 4))
    tiers.ensure((1, 2))                               # (1, 4) is still reading: stopped
    tiers.close()
    assert stats.cancelled == 1 and stats.bytes_moved["wasted"] == 0
    assert _held(tiers, (1, 2)) and tiers.slots.find((1, 4)) is None
    assert tiers.host._reserved == 0 and (1, 4) not in tiers.host


@both_threadings
def test_a_wrong_guess_whose_read_fails_is_counted_and_raised_only_when_used(
        transfer_thread):
    """A corrupt region that was only guessed does not stop decode; using it does."""
    store = SlowStore(delay=0.005)
    store.corrupt = {(1, 5), (3, 6), (4, 4)}
    tiers, stats = _tiers(store, transfer_thread=transfer_thread, host_regions=2)
    tiers.ensure((0, 1), then=(1, 5))                  # guess (1, 5): its read fails
    tiers.ensure((1, 3), then=(2, 7))                  # wrong guess: no error
    assert _held(tiers, (1, 3))
    tiers.ensure((2, 7), then=(3, 6))                  # right guess; next guess fails
    assert stats.failed_guesses == 1 and stats.predicted_right == 1
    with pytest.raises(md.ModelDirError, match="expert 6 of expert layer 3"):
        tiers.ensure((3, 6))                           # the corrupt expert is used
    tiers.ensure((3, 1), then=(4, 4))                  # decode can still go on
    tiers.close()                                      # the last guess failed: counted
    assert stats.failed_guesses == 2 and stats.bytes_moved["wasted"] == 0
    assert _held(tiers, (3, 1)) and tiers.host._reserved == 0
    assert all(k not in tiers.host for k in store.corrupt)


@both_threadings
def test_the_next_guess_never_evicts_the_slot_the_current_layer_computes_with(
        transfer_thread):
    """Even when the current layer's slot is the least recently used one."""
    store = SlowStore(delay=0.001)
    tiers, _ = _tiers(store, transfer_thread=transfer_thread)
    tiers.ensure((0, 0))
    tiers.ensure((1, 1))                               # slots: (0, 0) and (1, 1)
    tiers.slots.touch = lambda slot: None              # freeze the LRU clock ...
    tiers.slots._last[tiers.slots.find((0, 0))] = -1   # ... with (0, 0) the oldest
    tiers.ensure((0, 0), then=(1, 2))                  # (1, 2) must replace (1, 1)
    tiers.close()
    assert _held(tiers, (0, 0)) and _held(tiers, (1, 2)) and tiers.slots.find((1, 1)) is None


def test_with_a_transfer_thread_the_disk_reads_on_while_a_region_is_placed():
    """The next region's read starts before the previous region's device copy ends."""
    store = SlowStore(delay=0.01)
    tiers, _ = _tiers(store, transfer_thread=True)
    placed, load = [], tiers.slots.load

    def slow_load(slot, key, region):
        time.sleep(0.1)
        load(slot, key, region)
        placed.append((key, len(store.finished)))
    tiers.slots.load = slow_load
    tiers.ensure((0, 0), then=(1, 1))
    tiers.ensure((1, 1))
    tiers.close()
    # when (0, 0) was placed, (1, 1) had been read already (it takes 40 ms, the copy 100)
    assert placed == [((0, 0), 2), ((1, 1), 2)]
    assert _held(tiers, (1, 1)) and _held(tiers, (0, 0))


def test_decode_routes_and_guesses_in_one_call_per_expert_layer(exported, monkeypatch):
    """With the router predictor each decode step's expert layer j < last routes and
    guesses layer j+1 in one fused call; the last one only routes. Logits stay exact."""
    cfg, params, path = exported
    calls = {"route": 0, "route_and_guess": 0}
    for name in calls:
        fn = getattr(L, name)
        monkeypatch.setattr(L, name, lambda *a, _fn=fn, _n=name: (
            calls.__setitem__(_n, calls[_n] + 1), _fn(*a))[1])
    rng = np.random.default_rng(6)
    prompt, steps = rng.integers(0, 259, 5), rng.integers(0, 259, 4)
    ref = reference_logits(cfg, params, prompt, steps)
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1, device_slots=2,
                                                 predictor="router"))
    layers = len(engine.expert_layers)
    assert_engine_matches(engine, ref, prompt, steps)
    engine.close()
    assert calls["route_and_guess"] == len(steps) * (layers - 1)
    assert calls["route"] == layers + len(steps)       # prefill: one per layer; decode: last
    assert engine.stats.predictions == len(steps) * (layers - 1)


def test_pinned_host_tier_admits_fresh_regions_after_their_transfer(exported):
    """A disk read goes to the device from its read buffer and is pinned for the host
    cache afterwards: same logits as staging first, the cache ends up holding
    pinned_host arrays, and a replay of the same tokens reads nothing from disk."""
    cfg, _, path = exported
    rng = np.random.default_rng(3)
    prompt, steps = rng.integers(0, 259, 5), rng.integers(0, 259, 6)
    everything = cfg.model.n_pdr_layers * cfg.moe.num_experts * md.RegionLayout(
        cfg.model.d_model, cfg.model.d_ff).nbytes
    runs = {}
    for first in (False, True):
        engine = StreamingEngine(path, EngineOptions(host_budget_mb=2 * everything / 2**20,
                                                     device_slots=2, warm_start=False,
                                                     use_deltas=False,
                                                     host_memory_kind="pinned_host",
                                                     pin_before_transfer=first))
        sent, load = [], engine.slots.load
        engine.slots.load = lambda slot, key, host: (sent.append(isinstance(host, np.ndarray)),
                                                     load(slot, key, host))[1]
        out = []
        for rep in range(2):                            # the second pass replays the first
            state = engine.new_state()
            logits, state = engine.forward(prompt, state)
            out.append(logits)
            for tok in steps:
                logits, state = engine.forward(np.array([tok]), state)
                out.append(logits)
            if rep == 0:
                engine.tiers.flush_admissions()               # admitted in order
                read = engine.store.bytes_read
                from_numpy = sum(sent)
        entries = list(engine.host._entries.values())
        engine.close()
        runs[first] = np.stack(out)
        assert entries and all(a.sharding.memory_kind == "pinned_host" for a in entries)
        assert engine.host.hits > 0 and engine.host.peak_bytes <= engine.host.budget_bytes
        assert engine.host._reserved == 0
        # read buffers alive outside the entries: counted, and within the budget's share
        assert 1 <= engine.tiers.buffers_peak <= engine.tiers.buffers_budgeted
        assert engine.tiers.buffers_alive == 0
        # each fresh read went to the device from its numpy buffer, unless pinned first
        assert from_numpy == (0 if first else read // engine.region_bytes) and read > 0
        if not first:
            assert engine.store.bytes_read == read     # replay: every region was cached
            assert sum(sent) == from_numpy             # pass 2 sent only pinned copies
    np.testing.assert_array_equal(runs[False], runs[True])


def test_read_buffers_waiting_for_a_slow_admission_are_bounded(exported):
    import time as _time
    from perspective_jax.infer import expert_tiers
    _, _, path = exported
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=4, device_slots=2,
                                                 warm_start=False, use_deltas=False,
                                                 host_memory_kind="pinned_host"))
    place = engine.host.place
    engine.host.place = lambda r: (_time.sleep(0.05), place(r))[1]   # slow pinning
    waiting = []
    tiers = engine.tiers
    submit = tiers._admit_pool.submit
    tiers._admit_pool.submit = lambda *a: (waiting.append(sum(not f.done() for f in
                                                             tiers._admit_futures)),
                                           submit(*a))[1]
    state = engine.new_state()
    for tok in np.random.default_rng(5).integers(0, 259, 12):
        _, state = engine.forward(np.array([tok]), state)
    engine.close()
    assert len(waiting) > expert_tiers.MAX_QUEUED_ADMISSIONS
    assert engine.tiers.buffers_peak == engine.tiers.buffers_budgeted   # all of them used
    assert max(waiting) == expert_tiers.MAX_QUEUED_ADMISSIONS - 1   # one more is then queued


@both_threadings
def test_wrong_prefetches_still_reading_are_cancelled_and_decode_stays_exact(
        exported, transfer_thread):
    """Slow disk reads keep wrong guesses in flight when their layer arrives: they are
    stopped, the right expert is loaded, logits equal the in-memory model's and the
    host cache's reservations all come back (with a transfer thread: from a pinned
    host tier, whose read buffers are budgeted too)."""
    import time as _time
    cfg, params, path = exported
    rng = np.random.default_rng(4)
    prompt, steps = rng.integers(0, 259, 6), rng.integers(0, 259, 8)
    ref = reference_logits(cfg, params, prompt, steps)
    region = md.RegionLayout(cfg.model.d_model, cfg.model.d_ff).nbytes
    buffers = expert_tiers.MAX_QUEUED_ADMISSIONS + 3 if transfer_thread else 0
    engine = StreamingEngine(path, EngineOptions(
        host_budget_mb=(2 + buffers) * region / 2**20, device_slots=2, warm_start=False,
        use_deltas=False, predictor="previous", cancel_wrong_reads=True,
        transfer_thread=transfer_thread,
        host_memory_kind="pinned_host" if transfer_thread else None))
    read = engine.store.read_region

    def slow_read(j, e, cancel=None):
        _time.sleep(0.03)
        return read(j, e, cancel=cancel)
    engine.store.read_region = slow_read
    assert_engine_matches(engine, ref, prompt, steps)
    report = engine.report()
    engine.close()
    assert report["prefetch_cancelled"] > 0
    assert report["host_read_buffers_peak"] <= report["host_read_buffers_budgeted"]
    assert engine.host._reserved == 0 and engine.host.peak_bytes <= engine.host.budget_bytes
