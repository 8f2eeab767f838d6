"""Neighbour deltas: the two record encodings (positions, byte-change bitmap), the
exporter's choice, reading format-5 directories, deltas applied at the host tier
("host_delta") and the disk / host→device bytes counted per tier."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from perspective_jax.export.experts import ExpertWriter, hub_region
from perspective_jax.fileio import sha256_file
from perspective_jax.infer import expert_tiers
from perspective_jax.infer import stats as stats_mod
from perspective_jax.infer.device_slots import DeviceSlots
from perspective_jax.infer.engine import StreamingEngine, Stats
from perspective_jax.infer.expert_store import ExpertStore
from perspective_jax.infer.host_cache import HostCache
from perspective_jax.infer.options import EngineOptions
from perspective_jax.modeldir import format as md
from perspective_jax.modeldir.manifest import read_manifest
from streaming_helpers import assert_engine_matches, flip_bit, reference_logits

both_threadings = pytest.mark.parametrize("transfer_thread", [False, True],
                                          ids=["io-thread", "transfer-thread"])


def _padded(n: int) -> int:
    return n + (-n) % 4


def _changed(rng, src, n):
    """`src` with n distinct bytes changed (each to another value)."""
    dst = src.copy()
    at = rng.choice(len(src), n, replace=False)
    dst[at] = src[at] + rng.integers(1, 256, n).astype(np.uint8)
    return dst


# ------------------------------------------------------------------ the records
@pytest.mark.parametrize("region_bytes", [1, 13, 1152, 4099])
@pytest.mark.parametrize("encoding", [md.DELTA_POSITIONS, md.DELTA_BITMAP])
def test_both_encodings_round_trip_exactly(region_bytes, encoding):
    """(the "fields" record, which needs trit codes and its source: test_hub_deltas)"""
    rng = np.random.default_rng(region_bytes)
    src = rng.integers(0, 256, region_bytes, dtype=np.uint8)
    for n in sorted({0, 1, region_bytes // 7, region_bytes}):
        dst = _changed(rng, src, n)
        pos, val = md.encode_delta(src, dst)
        rec = md.delta_record(pos, val, encoding, region_bytes)
        head = 4 * n if encoding == "positions" else -(-region_bytes // 8)
        assert len(rec) == md.delta_record_bytes(encoding, n, region_bytes) == _padded(head + n)
        got_pos, got_val = md.parse_delta(rec, encoding, n, region_bytes)
        ref = src.copy()                                   # numpy reference of applying
        changed = src != dst
        ref[changed] = dst[changed]
        out = src.copy()
        out[got_pos] = got_val
        assert np.array_equal(out, dst) and np.array_equal(ref, dst)
        assert np.array_equal(md.apply_delta(src, got_pos, got_val), dst)
        assert np.array_equal(got_pos, np.flatnonzero(changed))


def test_the_smaller_encoding_is_chosen():
    region = 4096                                      # bitmap head: 512 bytes
    for n in (0, 1, 100, 127, 128, 129, 200, 4096):
        positions, bitmap = _padded(5 * n), _padded(512 + n)
        want = "bitmap" if bitmap < positions else "positions"
        assert md.smaller_encoding(n, region) == want, n
    assert md.smaller_encoding(100, region) == "positions"
    assert md.smaller_encoding(200, region) == "bitmap"


def _layer(tmp_path, changes, share=0.5):
    """One expert layer on the 2×2×2 lattice written by the exporter: expert 0 random,
    expert k (k = 1, 2, 4: its lattice neighbours) expert 0 with `changes[k]` bytes
    changed, the rest random. Returns (store, manifest entry, regions)."""
    layout = md.RegionLayout(32, 48)                   # 1152 bytes; bitmap head 144
    rng = np.random.default_rng(0)
    regions = [rng.integers(0, 256, layout.nbytes, dtype=np.uint8) for _ in range(8)]
    for k, n in changes.items():
        regions[k] = _changed(rng, regions[0], n)
    writer = ExpertWriter(str(tmp_path), layout, (2, 2, 2), share)
    entry = writer.layer(0, regions)
    manifest = {"config": {"model": {"d_model": 32, "d_ff": 48}},
                "experts": {"layers": [entry]}}
    return ExpertStore(str(tmp_path), manifest), entry, regions


def test_the_exporter_writes_the_smaller_record_and_keeps_it_within_the_share(tmp_path):
    # 10 changed bytes: positions (52) < bitmap (156); 300: bitmap 444 ≤ 576 = 0.5·1152,
    # positions 1500 would not have been kept; 500: bitmap 644 > 576, dropped
    store, entry, regions = _layer(tmp_path, {1: 10, 2: 300, 4: 500})
    kept = {(d["src"], d["dst"]): d for d in entry["deltas"]}
    assert {k for k in kept if k[0] < 8} == {(0, 1), (1, 0), (0, 2), (2, 0)}
    hub = hub_region(regions)                     # source 8: deltas to any expert
    assert all(d["bytes"] <= 576 for k, d in kept.items() if k[0] == 8)
    assert kept[(0, 1)]["encoding"] == "positions" and kept[(0, 2)]["encoding"] == "bitmap"
    size = os.path.getsize(tmp_path / md.delta_file(0))
    assert size == sum(d["bytes"] for d in entry["deltas"])
    for (a, b), d in kept.items():
        assert d["bytes"] == store.delta_bytes(0, a, b) == md.delta_record_bytes(
            d["encoding"], d["count"], store.region_bytes)
        pos, val = store.read_delta(0, a, b)
        base = regions[a] if a < 8 else hub
        assert np.array_equal(md.apply_delta(base, pos, val), regions[b])
    assert store.bytes_read == size


def test_a_flipped_byte_in_a_bitmap_delta_fails_its_checksum(tmp_path):
    store, entry, _ = _layer(tmp_path, {2: 300})
    d = next(d for d in entry["deltas"] if d["encoding"] == "bitmap")
    flip_bit(str(tmp_path / md.delta_file(0)), d["offset"] + 5)      # in the bitmap
    with pytest.raises(md.ModelDirError, match=rf"delta {d['src']}->{d['dst']} of expert "
                       "layer 0 fails its checksum"):
        store.read_delta(0, d["src"], d["dst"])


def _as_format_5(path):
    """Rewrite the model directory `path` as format 5 wrote it: no hub, every delta
    record in positions, entries without "encoding" and "bytes"; files and seal
    updated."""
    manifest_path = os.path.join(path, md.MANIFEST)
    with open(manifest_path) as fh:
        manifest = json.load(fh)
    store = ExpertStore(path, manifest)
    for j, layer in enumerate(manifest["experts"]["layers"]):
        records, at = [], 0
        layer.pop("hub")
        layer["deltas"] = [d for d in layer["deltas"] if d["src"] < len(layer["regions"])]
        for d in layer["deltas"]:
            rec = md.delta_record(*store.read_delta(j, d["src"], d["dst"]))
            for key in ("encoding", "bytes"):
                del d[key]
            d.update(offset=at, **{md.REGION_CHECKSUM: md.region_digest(rec)})
            records.append(rec)
            at += len(rec)
        rel = layer["delta_file"]
        with open(os.path.join(path, rel), "wb") as fh:
            fh.write(b"".join(records))
        full = os.path.join(path, rel)
        manifest["files"][rel] = {"bytes": os.path.getsize(full), "sha256": sha256_file(full)}
    manifest["format_version"] = 5
    manifest.pop(md.MANIFEST_CHECKSUM)
    with open(manifest_path, "w") as fh:
        json.dump(md.seal_manifest(manifest), fh)


def test_a_format_5_directory_reads_its_deltas_as_positions(exported, tmp_path):
    cfg, params, path = exported
    old = str(tmp_path / "old")
    shutil.copytree(path, old)
    for root, _, names in os.walk(old):
        for name in names:
            os.chmod(os.path.join(root, name), 0o644)
    _as_format_5(old)
    manifest = read_manifest(old)
    assert manifest["format_version"] == 5
    new_store, old_store = ExpertStore(path, read_manifest(path)), ExpertStore(old, manifest)
    for j, layer in enumerate(manifest["experts"]["layers"]):
        for d in layer["deltas"]:
            assert old_store.delta_bytes(j, d["src"], d["dst"]) == _padded(5 * d["count"])
            for got, want in zip(old_store.read_delta(j, d["src"], d["dst"]),
                                 new_store.read_delta(j, d["src"], d["dst"])):
                assert np.array_equal(got, want)
    rng = np.random.default_rng(8)
    prompt, steps = rng.integers(0, 259, 5), rng.integers(0, 259, 6)
    engine = StreamingEngine(old, EngineOptions(host_budget_mb=1, device_slots=2))
    assert_engine_matches(engine, reference_logits(cfg, params, prompt, steps), prompt, steps)
    engine.close()


# ------------------------------------------------------------ the host tier
def _pair(store, j=0):
    """(src, dst, its manifest delta entry) of a delta of expert layer j."""
    d = store.layers[j]["deltas"][0]
    return d["src"], d["dst"], d


def _tiers(store, use_deltas=True, transfer_thread=False, host_regions=4):
    stats = Stats()
    host = HostCache(host_regions * store.alloc_bytes, store.alloc_bytes)
    tiers = expert_tiers.ExpertTiers(
        store, host, DeviceSlots(2, store.region_bytes, jax.devices()[0]), stats,
        stage_in_place=True, use_deltas=use_deltas, transfer_thread=transfer_thread)
    return tiers, stats


def _neighbour_off_the_device(tiers, a, guess=None):
    """Bring (0, a) through the tiers, then regions of layers 1 and 2 so that no slot
    holds an expert of layer 0 (the host cache still holds (0, a)); the last one
    guesses `guess` for the next layer."""
    tiers.ensure((0, a))
    tiers.ensure((1, 0))
    assert (0, a) in tiers.host
    tiers.ensure((2, 0), then=guess)
    if guess is None:
        assert all(k is None or k[0] != 0 for k in tiers.slots.keys)


def _holds(tiers, store, key):
    slot = tiers.slots.find(key)
    return slot is not None and np.array_equal(np.asarray(tiers.slots.arrays[slot]),
                                               store.read_region(*key))


@both_threadings
@pytest.mark.parametrize("guessed", [False, True], ids=["asked", "guessed"])
def test_a_neighbour_in_the_host_cache_saves_the_disk_read(exported, transfer_thread,
                                                           guessed):
    """No slot holds layer 0; the host holds a, so b is built from a and the delta a→b:
    disk bytes fall by a region less the delta's record (from the manifest)."""
    _, _, path = exported
    read = {}
    for use_deltas in (False, True):
        store = ExpertStore(path, read_manifest(path))
        a, b, d = _pair(store)
        tiers, stats = _tiers(store, use_deltas, transfer_thread)
        _neighbour_off_the_device(tiers, a, guess=(0, b) if guessed else None)
        tiers.ensure((0, b))
        tiers.close()
        kind = "host_delta" if use_deltas else "full"
        assert stats.transfers[kind] == 1 + 3 * (kind == "full")
        assert stats.predicted_right == guessed
        assert stats.disk_bytes[kind] == (d["bytes"] if use_deltas else 4 * store.region_bytes)
        assert stats.bytes_moved[kind] == stats.transfers[kind] * store.region_bytes
        read[use_deltas] = store.bytes_read
        assert sum(stats.disk_bytes.values()) == store.bytes_read
        assert _holds(tiers, store, (0, b)) and (0, b) in tiers.host
    assert read[False] - read[True] == store.region_bytes - d["bytes"]


def test_no_host_delta_when_the_cache_has_room_only_by_evicting_its_base(exported):
    _, _, path = exported
    store = ExpertStore(path, read_manifest(path))
    a, b, _ = _pair(store)
    tiers, stats = _tiers(store, host_regions=1)
    tiers.ensure((0, a))
    tiers.slots.keys[:] = [None] * tiers.slots.n_slots      # empty the device tier
    tiers.ensure((0, b))
    tiers.close()
    assert stats.transfers["host_delta"] == 0 and stats.transfers["full"] == 2
    assert stats.disk_bytes["full"] == store.bytes_read == 2 * store.region_bytes
    assert _holds(tiers, store, (0, b)) and list(tiers.host._entries) == [(0, b)]


@pytest.mark.parametrize("damage", ["delta file", "wrong base"])
def test_a_damaged_host_delta_is_read_in_full_with_a_warning(exported_writable, damage):
    _, _, path = exported_writable
    store = ExpertStore(path, read_manifest(path))
    a, b, d = _pair(store)
    if damage == "delta file":
        flip_bit(os.path.join(path, md.delta_file(0)), d["offset"] + 3)
    tiers, stats = _tiers(store)
    _neighbour_off_the_device(tiers, a)
    if damage == "wrong base":                 # the host entry of a no longer is a's codes
        tiers.host._entries[(0, a)] = _changed(np.random.default_rng(0),
                                               tiers.host._entries[(0, a)], 1)
    tiers.ensure((0, b))
    tiers.close()
    assert stats.transfers["host_delta"] == 0 and stats.transfers["full"] == 4
    assert len(stats.damaged_deltas) == 1 and not store.has_delta(0, a, b)
    why = "fails its checksum" if damage == "delta file" else "does not give expert"
    assert f"delta {a}->{b} of expert layer 0" in stats.damaged_deltas[0]
    assert why in stats.damaged_deltas[0] and "loaded in full" in stats.damaged_deltas[0]
    assert _holds(tiers, store, (0, b))
    assert tiers.host._reserved == 0 and tiers.buffers_alive == 0


# ------------------------------------------------------------- the engine
@both_threadings
def test_decode_with_deltas_on_and_off_gives_the_same_logits_and_fewer_disk_bytes(
        exported, transfer_thread):
    """Two device slots, a host cache holding every region: deltas at both tiers
    happen, the logits are the in-memory model's either way, and the bytes by tier add
    up (disk bytes counted per bring = the store's reads; per token ≤ in total)."""
    cfg, params, path = exported
    rng = np.random.default_rng(11)
    prompt, steps = rng.integers(0, 259, 6), rng.integers(0, 259, 24)
    ref = reference_logits(cfg, params, prompt, steps)
    region = md.RegionLayout(cfg.model.d_model, cfg.model.d_ff).nbytes
    everything = len(read_manifest(path)["experts"]["layers"]) * cfg.moe.num_experts
    reports, logits = {}, {}
    for deltas in (False, True):
        engine = StreamingEngine(path, EngineOptions(
            host_budget_mb=(everything + 8) * 2 * region / 2**20, device_slots=2,
            warm_start=False, use_deltas=deltas, predictor="previous",
            transfer_thread=transfer_thread,
            host_memory_kind="pinned_host" if transfer_thread else None))
        state = engine.new_state()
        out, state = engine.forward(prompt, state)
        got = [out]
        for tok in steps:
            out, state = engine.forward(np.array([tok]), state)
            got.append(out)
        engine.tiers.flush_admissions()
        reports[deltas] = r = engine.report()
        engine.close()
        logits[deltas] = np.stack(got)
        np.testing.assert_allclose(logits[deltas], np.stack(ref), rtol=1e-4, atol=1e-4)
        # every read is counted by kind, but the hubs pinned before decoding
        assert (sum(r["disk_bytes"].values()) + r["hub_regions_pinned"] * region
                == r["disk_bytes_read"])
        assert r["hub_regions_pinned"] == (everything // cfg.moe.num_experts if deltas else 0)
        assert r["host_read_buffers_peak"] <= r["host_read_buffers_budgeted"]
        tokens = r["decode_tokens"]
        assert 0 < r["disk_bytes_per_token"] * tokens <= r["disk_bytes_read"]
        assert 0 < r["host_to_device_bytes_per_token"] * tokens <= sum(
            r["bytes_moved"].values())
    np.testing.assert_array_equal(logits[False], logits[True])
    on, off = reports[True], reports[False]
    assert off["transfers"]["delta"] == off["transfers"]["host_delta"] == 0
    assert on["transfers"]["host_delta"] > 0 and on["transfers"]["delta"] > 0
    assert on["disk_bytes_read"] < off["disk_bytes_read"]
    assert on["disk_bytes"]["host_delta"] < on["transfers"]["host_delta"] * region


def test_bytes_count_for_the_forward_that_spent_them():
    """Bytes counted during a forward go to decode or prefill by which token count
    the engine then advanced; --stats divides decode bytes by decoded tokens."""
    s = Stats()
    s.count_bytes("full", 100, 100)            # a prefill forward ...
    s.count_bytes("host_delta", 100, 30)
    s.prefill_tokens += 5                      # ... accounted
    s.count_bytes("delta", 20, 40)             # a decode forward, with a wrong guess
    s.count_bytes("wasted", 100, 100)
    s.decode_tokens += 1
    s.count_bytes("same", 0, 0)
    s.decode_tokens += 1
    assert s.tier_bytes() == {"decode": {"disk": 140, "host_to_device": 120},
                              "prefill": {"disk": 130, "host_to_device": 200}}
    assert s.disk_bytes == {"full": 100, "host_delta": 30, "delta": 40, "wasted": 100,
                            "same": 0}
    assert s.bytes_moved["wasted"] == 100 and s.bytes_moved["host_delta"] == 100
    r = stats_mod.tier_report(s, s.decode_tokens)
    assert r["disk_bytes_per_token"] == 70 and r["host_to_device_bytes_per_token"] == 60
