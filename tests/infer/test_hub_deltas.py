"""Each expert layer's hub: the export writes the per-trit majority of the layer's
regions after them and a delta from it to every expert; the engine pins it in the host
cache, so a region the cache misses is built from the hub's delta — exact logits."""

import collections
import json
import os
import shutil

import numpy as np
import pytest

from perspective_jax.export.experts import hub_region
from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.host_cache import HostCache
from perspective_jax.infer.options import EngineOptions
from perspective_jax.modeldir import format as md
from perspective_jax.modeldir.manifest import read_manifest
from streaming_helpers import reference_logits


def loop_majority(regions):
    """Per byte, per 2-bit field: the most common code (ties: the smallest)."""
    out = bytearray(len(regions[0]))
    for i in range(len(out)):
        for shift in (0, 2, 4, 6):
            counts = collections.Counter((int(r[i]) >> shift) & 3 for r in regions)
            best = max(range(4), key=lambda v: (counts[v], -v))
            out[i] |= best << shift
    return np.frombuffer(bytes(out), np.uint8)


def trit_mismatches(a, b):
    x = np.bitwise_xor(a, b)
    return int(np.unpackbits((x | (x >> 1)) & 0x55).sum())


def test_the_hub_is_the_per_trit_majority_and_nearest_to_all_regions():
    rng = np.random.default_rng(0)
    regions = [rng.integers(0, 256, 700, dtype=np.uint8) for _ in range(5)]
    regions[1][:300] = regions[0][:300]
    hub = hub_region(regions, chunk=128)              # several chunks
    np.testing.assert_array_equal(hub, loop_majority(regions))
    total = sum(trit_mismatches(hub, r) for r in regions)
    assert all(total <= sum(trit_mismatches(r, s) for s in regions) for r in regions)


def trit_region(rng, n):
    """n bytes of four 2-bit codes each in 0..2 (trits + 1, as regions hold them)."""
    codes = rng.integers(0, 3, (n, 4)).astype(np.uint8)
    return (codes << np.arange(0, 8, 2, dtype=np.uint8)).sum(1).astype(np.uint8)


def test_a_fields_record_round_trips_and_is_sized_by_its_formula():
    rng = np.random.default_rng(2)
    for n, share in ((1001, 0.02), (4096, 0.2), (333, 0.9)):
        src = trit_region(rng, n)
        dst = src.copy()
        hit = rng.random(n) < share
        dst[hit] = trit_region(rng, int(hit.sum()))
        m = sum(((int(a) >> k) & 3) != ((int(b) >> k) & 3)
                for a, b in zip(src, dst) for k in (0, 2, 4, 6))          # loop count
        assert md.changed_fields(src, dst) == m
        pos, val = md.encode_delta(src, dst)
        rec = md.delta_record(pos, val, md.DELTA_FIELDS, n, src)
        assert len(rec) == md.delta_record_bytes(md.DELTA_FIELDS, len(pos), n, m)
        got_pos, got_val = md.parse_delta(rec, md.DELTA_FIELDS, len(pos), n, src)
        np.testing.assert_array_equal(got_pos, pos)
        np.testing.assert_array_equal(md.apply_delta(src, got_pos, got_val), dst)
        with pytest.raises(ValueError, match="needs its source region"):
            md.parse_delta(rec, md.DELTA_FIELDS, len(pos), n)
    bad = trit_region(rng, 8)
    other = bad.copy()
    other[3] |= 3                                          # a field set to code 3
    assert md.changed_fields(bad, other) == -1


def test_every_expert_has_a_delta_from_its_layers_hub(exported):
    cfg, _, path = exported
    manifest = read_manifest(path)
    n = cfg.moe.num_experts
    region = md.RegionLayout(cfg.model.d_model, cfg.model.d_ff).nbytes
    for j, layer in enumerate(manifest["experts"]["layers"]):
        with open(f"{path}/{layer['file']}", "rb") as fh:
            data = np.frombuffer(fh.read(), np.uint8)
        regions = [data[r["offset"]: r["offset"] + region] for r in layer["regions"]]
        at = layer["hub"]["offset"]
        np.testing.assert_array_equal(data[at: at + region], hub_region(regions))
        sources = {(d["src"], d["dst"]) for d in layer["deltas"]}
        assert all((n, e) in sources for e in range(n))


def test_a_hub_in_a_directory_of_an_older_format_is_refused(exported, tmp_path):
    _, _, path = exported
    old = str(tmp_path / "old")
    shutil.copytree(path, old)
    manifest_path = f"{old}/{md.MANIFEST}"
    manifest = json.load(open(manifest_path))
    assert manifest["format_version"] == md.FORMAT_VERSION == md.HUB_VERSION
    manifest["format_version"] = md.HUB_VERSION - 1
    manifest.pop(md.MANIFEST_CHECKSUM)
    os.chmod(manifest_path, 0o644)
    with open(manifest_path, "w") as fh:
        json.dump(md.seal_manifest(manifest), fh)
    with pytest.raises(md.ModelDirError, match="expert layer 0 has a hub, which format "
                       f"version {md.HUB_VERSION - 1} does not have"):
        read_manifest(old)


def test_a_pinned_entry_is_never_evicted_and_pins_stop_at_half_the_cache():
    cache = HostCache(budget_bytes=4 * 10, entry_bytes=10)
    read = lambda j, e: np.full(10, e, np.uint8)                  # noqa: E731
    assert cache.pin((0, 5), read) and cache.pin((1, 6), read)
    assert not cache.pin((2, 7), read)                            # 3 of 4 entries: refused
    for e in range(20):
        assert cache.reserve()
        cache.admit((3, e), read(3, e), reserved=True)
        assert (0, 5) in cache and (1, 6) in cache
    assert len(cache) == 4


@pytest.mark.parametrize("pin", [True, False])
def test_misses_are_built_from_the_pinned_hubs_and_decode_stays_exact(exported, pin):
    cfg, params, path = exported
    rng = np.random.default_rng(3)
    prompt, steps = rng.integers(0, 259, 7), rng.integers(0, 259, 20)
    ref = reference_logits(cfg, params, prompt, steps)
    n_layers = len(read_manifest(path)["experts"]["layers"])
    region = md.RegionLayout(cfg.model.d_model, cfg.model.d_ff).nbytes
    engine = StreamingEngine(path, EngineOptions(
        host_budget_mb=(2 * n_layers + 2) * region / 2 ** 20, device_slots=2,
        warm_start=False, pin_hubs=pin, host_memory_kind="numpy"))     # any backend
    state = engine.new_state()
    got, state = engine.forward(prompt, state)
    np.testing.assert_allclose(got, ref[0], rtol=1e-4, atol=1e-4)
    for k, tok in enumerate(steps):
        got, state = engine.forward(np.array([tok]), state)
        np.testing.assert_allclose(got, ref[k + 1], rtol=1e-4, atol=1e-4)
    report = engine.report()
    engine.close()
    assert report["hub_regions_pinned"] == (n_layers if pin else 0)
    kinds = report["transfers"]
    if pin:                   # every miss has its hub at hand: no full read from disk
        assert kinds["host_delta"] > 0
        assert report["disk_bytes"]["full"] == 0
