"""Each expert layer's hub: the export picks the medoid of the layer's regions and
writes a delta from it to every other expert; the engine pins it in the host cache,
so a region the cache misses is built from the hub's delta — exact logits, fewer
bytes read from disk than with the hubs unpinned."""

import numpy as np
import pytest

from perspective_jax.export.experts import HUB_SAMPLE_BYTES, hub_expert
from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.host_cache import HostCache
from perspective_jax.infer.options import EngineOptions
from perspective_jax.modeldir import format as md
from perspective_jax.modeldir.manifest import read_manifest
from streaming_helpers import reference_logits


def brute_force_medoid(regions):
    cost = [sum(int(np.count_nonzero(a != b)) for b in regions) for a in regions]
    return int(np.argmin(cost))


def test_the_hub_is_the_medoid_of_the_regions():
    rng = np.random.default_rng(0)
    for trial in range(5):
        regions = [rng.integers(0, 4, 3000, dtype=np.uint8) for _ in range(6)]
        centre = rng.integers(0, 6)
        for x in range(6):                     # every other region: centre + 10 % noise
            if x != centre:
                regions[x] = regions[centre].copy()
                hit = rng.random(3000) < 0.1 * (1 + x % 3)
                regions[x][hit] = rng.integers(0, 256, hit.sum())
        assert hub_expert(regions) == brute_force_medoid(regions) == centre
    big = [rng.integers(0, 2, 5 * HUB_SAMPLE_BYTES, dtype=np.uint8) for _ in range(4)]
    big[2] = (big[0] & big[1]) | (big[0] & big[3]) | (big[1] & big[3])    # the majority
    assert hub_expert(big) == brute_force_medoid(big) == 2


def test_every_expert_has_a_delta_from_its_layers_hub(exported):
    cfg, _, path = exported
    manifest = read_manifest(path)
    region = md.RegionLayout(cfg.model.d_model, cfg.model.d_ff).nbytes
    for j, layer in enumerate(manifest["experts"]["layers"]):
        with open(f"{path}/{layer['file']}", "rb") as fh:
            data = np.frombuffer(fh.read(), np.uint8)
        regions = [data[r["offset"]: r["offset"] + region] for r in layer["regions"]]
        assert layer["hub"] == hub_expert(regions)
        sources = {(d["src"], d["dst"]) for d in layer["deltas"]}
        assert all((layer["hub"], e) in sources
                   for e in range(cfg.moe.num_experts) if e != layer["hub"])


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
        warm_start=False, pin_hubs=pin))
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
