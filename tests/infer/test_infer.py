"""Streaming inference: export, tiered expert store, engine == in-memory model."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perspective_jax.config.param_layout import expert_layers
from perspective_jax.errors import UserError
from perspective_jax.quant import embedding_int8
from perspective_jax.quant import gptq
from perspective_jax.modeldir import format as md
from perspective_jax.modeldir.manifest import read_manifest
from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.options import EngineOptions
from perspective_jax.export.exporter import with_embedding, with_ternary_experts
from perspective_jax.infer.host_cache import HostCache
from perspective_jax.model.transformer import init_params
from streaming_helpers import (assert_engine_matches, export_model, reference_logits,
                               routed_cfg)


def test_engine_equals_in_memory_model_with_evictions_and_deltas(exported):
    cfg, params, path = exported
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 259, 21)
    steps = rng.integers(0, 259, 64)
    ref = reference_logits(cfg, params, prompt, steps)
    region = md.RegionLayout(cfg.model.d_model, cfg.model.d_ff).nbytes
    n_layers = cfg.model.n_pdr_layers
    # host budget: 3 regions (forces evictions); one slot per expert layer + 1 so that
    # each layer's last expert stays on the device and neighbours arrive as deltas
    # numpy host tier on every backend: a pinned tier's staging buffers (GPU) would not
    # leave room for 3 regions
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=3 * region / 2**20,
                                                 device_slots=n_layers + 1,
                                                 host_memory_kind="numpy"))
    assert_engine_matches(engine, ref, prompt, steps)
    report = engine.report()
    engine.close()
    assert report["transfers"]["delta"] > 0 and report["transfers"]["full"] > 0
    assert report["host_cache_evictions"] > 0
    assert engine.host.peak_bytes <= engine.host.budget_bytes
    assert report["bytes_moved"]["delta"] < report["transfers"]["delta"] * region


def test_engine_with_the_gpu_kernel_choice_is_exact(exported, monkeypatch):
    """The dispatch a GPU gets (Pallas kernel for decode rows, decode-then-matmul for
    prefill groups), run here with the kernel interpreted."""
    import kernels_pallas.ternary_matmul as tm
    chosen = set()

    def gpu_choice(rows):
        chosen.add("pallas" if rows < tm.DEQUANT_MIN_ROWS else "dequant")
        return "pallas" if rows < tm.DEQUANT_MIN_ROWS else "dequant"
    monkeypatch.setattr(tm, "default_impl", gpu_choice)
    cfg, params, path = exported
    rng = np.random.default_rng(2)
    prompt, steps = rng.integers(0, 259, 40), rng.integers(0, 259, 6)
    ref = reference_logits(cfg, params, prompt, steps)
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1, device_slots=2,
                                                 host_memory_kind="pinned_host"))
    assert_engine_matches(engine, ref, prompt, steps)
    engine.close()
    assert chosen == {"pallas", "dequant"}      # both GPU paths were traced and checked


def test_double_buffer_with_prefetch_and_chunked_prefill_is_exact(exported):
    cfg, params, path = exported
    rng = np.random.default_rng(1)
    prompt, steps = rng.integers(0, 259, 30), rng.integers(0, 259, 12)
    ref = reference_logits(cfg, params, prompt, steps)
    for predictor in ("router", "previous"):           # host tier in pinned_host memory
        engine = StreamingEngine(path, EngineOptions(host_budget_mb=1, device_slots=2,
                                                     predictor=predictor, prefill_chunk=7,
                                                     use_deltas=False,
                                                     host_memory_kind="pinned_host"))
        assert_engine_matches(engine, ref, prompt, steps)
        report = engine.report()
        engine.close()
        assert report["transfers"]["delta"] == 0
        assert sum(report["transfers"].values()) >= len(steps) * cfg.model.n_pdr_layers


def test_delta_reproduces_target_region_exactly(exported):
    cfg, _, path = exported
    from perspective_jax.infer.expert_store import ExpertStore
    manifest = read_manifest(path)
    store = ExpertStore(path, manifest)
    checked = 0
    for j, layer in enumerate(manifest["experts"]["layers"]):
        for d in layer["deltas"]:
            src, dst = store.read_region(j, d["src"]), store.read_region(j, d["dst"])
            pos, val = store.read_delta(j, d["src"], d["dst"], src)   # src: the hub's too
            assert np.array_equal(md.apply_delta(src, pos, val), dst)
            checked += 1
    assert checked > 0
    # and on the device: the in-place scatter gives the same bytes
    from perspective_jax.infer.device_slots import DeviceSlots
    slots = DeviceSlots(2, store.region_bytes, jax.devices()[0])
    d = manifest["experts"]["layers"][0]["deltas"][0]
    slots.load(0, (0, d["src"]), store.read_region(0, d["src"]))
    slots.apply_delta(0, (0, d["dst"]), *store.read_delta(0, d["src"], d["dst"]))
    assert np.array_equal(np.asarray(slots.arrays[0]), store.read_region(0, d["dst"]))


def test_exported_experts_are_exact_ternary_values(exported):
    cfg, params, path = exported
    from kernels_pallas.ternary_matmul import ternary_matmul_reference
    from perspective_jax.infer.expert_store import ExpertStore
    from safetensors.numpy import load_file
    manifest = read_manifest(path)
    store = ExpertStore(path, manifest)
    shared = load_file(os.path.join(path, md.SHARED_FILE))
    used = with_ternary_experts(jax.tree.map(np.asarray, params), cfg)
    layout = store.layout
    p, i = expert_layers(cfg.model)[1]
    parts = layout.split(store.read_region(1, 5))
    for m, name in enumerate(md.EXPERT_MATRICES):
        k = parts[name].shape[0] * 4
        eye = np.eye(k, dtype=np.float32)[: used["periods"][f"layer_{i}"]["ffn"][name].shape[-2]]
        scale = shared[md.scale_key(name)][1, 5]
        w = np.asarray(ternary_matmul_reference(jnp.asarray(eye), parts[name], scale))
        np.testing.assert_allclose(w, used["periods"][f"layer_{i}"]["ffn"][name][p, 5],
                                   rtol=1e-6)


def test_flipped_byte_is_detected_and_named(exported_writable):
    _, _, path = exported_writable
    manifest = read_manifest(path)
    entry = manifest["experts"]["layers"][1]["regions"][3]
    target = os.path.join(path, md.expert_file(1))
    with open(target, "r+b") as fh:
        fh.seek(entry["offset"] + 17)
        byte = fh.read(1)
        fh.seek(entry["offset"] + 17)
        fh.write(bytes([byte[0] ^ 0xFF]))
    # no pinned hub: the host tier would build expert 3 from its hub's delta instead
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1, warm_start=False,
                                                 pin_hubs=False))
    engine.store.read_region(1, 2)                     # an intact neighbour reads fine
    with pytest.raises(md.ModelDirError, match=r"layer_001\.bin: expert 3 of expert layer 1"):
        engine.store.read_region(1, 3)
    with pytest.raises(md.ModelDirError):              # through the host tier:
        engine.tiers.host_region((1, 3))
    assert engine.host._reserved == 0 and (1, 3) not in engine.host   # space given back
    engine.close()


def test_a_damaged_delta_is_reported_and_its_expert_loaded_in_full(exported_writable, capsys):
    """A delta is a shortcut: one that fails its checksum is named in a warning, never
    used again, and its target expert comes in full — decoding stays exact."""
    cfg, params, path = exported_writable
    manifest = read_manifest(path)
    for layer in manifest["experts"]["layers"]:
        with open(os.path.join(path, layer["delta_file"]), "r+b") as fh:
            for delta in layer["deltas"]:                 # flip one byte of every delta
                fh.seek(delta["offset"])
                byte = fh.read(1)
                fh.seek(delta["offset"])
                fh.write(bytes([byte[0] ^ 0x01]))
    rng = np.random.default_rng(0)
    prompt, steps = rng.integers(0, 259, 21), rng.integers(0, 259, 24)
    ref = reference_logits(cfg, params, prompt, steps)
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1,
                                                 device_slots=cfg.model.n_pdr_layers + 1))
    assert_engine_matches(engine, ref, prompt, steps)
    report = engine.report()
    engine.close()
    damaged = engine.stats.damaged_deltas
    assert report["transfers"]["delta"] == 0 and report["damaged_deltas"] == len(damaged) > 0
    assert all("fails its checksum" in m and "loaded in full instead" in m for m in damaged)
    assert len(set(damaged)) == len(damaged)               # each reported once
    from perspective_jax.cli import infer
    capsys.readouterr()
    assert infer.run(["--model-dir", path, "abc", "--max-tokens", "6", "--temperature", "0",
                      "--device-slots", str(cfg.model.n_pdr_layers + 1)]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: ") == 1 and "re-export the model directory" in err
    assert "Traceback" not in err


@pytest.fixture
def chunked_store(tmp_path, monkeypatch):
    """(path, manifest) of a small synthetic model whose regions read in 3 pieces."""
    from perspective_jax.config import load_config
    from perspective_jax.infer import expert_store
    from perspective_jax.export.synthetic import write_synthetic_model_dir
    monkeypatch.setattr(expert_store, "READ_CHUNK", md.REGION_ALIGN)
    cfg = load_config(None, ["model.routed=true", "ternary.enabled=true", "model.d_model=64",
                             "model.d_ff=200", "model.n_layers=4", "model.vocab_size=259",
                             "data.tokenizer=byte"])
    path = str(tmp_path / "synthetic")
    write_synthetic_model_dir(path, cfg, seed=0, log=lambda *_: None)
    return path, read_manifest(path)


def test_direct_reads_in_chunks_match_mmap_and_catch_a_flip_in_a_late_chunk(chunked_store):
    from perspective_jax.infer import expert_store
    path, manifest = chunked_store
    mapped = expert_store.ExpertStore(path, manifest, io="mmap")
    direct = expert_store.ExpertStore(path, manifest, io="direct")
    assert direct.region_bytes > 2 * md.REGION_ALIGN               # 3 chunks
    for j in range(direct.n_layers):
        for e in range(len(manifest["experts"]["layers"][j]["regions"])):
            got = direct.read_region(j, e)
            assert got.ctypes.data % md.REGION_ALIGN == 0
            from_map = mapped.read_region(j, e)
            assert from_map.ctypes.data % expert_store.ARRAY_ALIGN == 0  # device_put aliases
            np.testing.assert_array_equal(got, from_map)
            np.testing.assert_array_equal(direct.read_region(j, e), got)   # verified re-read
    entry = manifest["experts"]["layers"][0]["regions"][5]
    with open(os.path.join(path, md.expert_file(0)), "r+b") as fh:
        fh.seek(entry["offset"] + direct.region_bytes - 3)                # last chunk
        byte = fh.read(1)
        fh.seek(entry["offset"] + direct.region_bytes - 3)
        fh.write(bytes([byte[0] ^ 0x01]))
    fresh = expert_store.ExpertStore(path, manifest, io="direct")
    with pytest.raises(md.ModelDirError, match=r"expert 5 of expert layer 0 fails its checksum"):
        fresh.read_region(0, 5)
    # a file truncated after the manifest was checked: the short read names the expert
    last = manifest["experts"]["layers"][0]["regions"][-1]
    os.truncate(os.path.join(path, md.expert_file(0)), last["offset"] + 10)
    with pytest.raises(md.ModelDirError, match=rf"short read of expert {last['expert']} of "
                                               r"expert layer 0 .* truncated"):
        fresh.read_region(0, last["expert"])
    for store in (mapped, direct, fresh):
        store.close()


class _SetAfter:
    """A cancel flag that turns set on its n-th look (a cancel arriving mid-read)."""

    def __init__(self, n):
        self.n = n

    def is_set(self):
        self.n -= 1
        return self.n < 0


def test_a_cancelled_read_stops_between_pieces_and_leaves_nothing_verified(chunked_store):
    from perspective_jax.infer import expert_store
    path, manifest = chunked_store
    for io in expert_store.IO_MODES:
        store = expert_store.ExpertStore(path, manifest, io=io)
        with pytest.raises(expert_store.ReadCancelled):
            store.read_region(1, 2, cancel=_SetAfter(2))        # after two pieces
        assert store.bytes_read == 2 * md.REGION_ALIGN
        assert ("region", 1, 2) not in store._verified
        full = store.read_region(1, 2, cancel=_SetAfter(99))     # never set: reads it all
        np.testing.assert_array_equal(full, expert_store.ExpertStore(path, manifest)
                                      .read_region(1, 2))
        store.close()


def test_synthetic_model_with_2bit_shared_weights_equals_dequantised_floats(tmp_path):
    """The engine's packed shared kernels (fused decode row, blocked prefill) compute
    what the same kernels expanded to float32 compute."""
    from perspective_jax.config import load_config
    from perspective_jax.export.synthetic import write_synthetic_model_dir
    from perspective_jax.quant.quantized_kernel import QuantizedKernel
    cfg = load_config(None, ["model.routed=true", "ternary.enabled=true", "model.d_model=64",
                             "model.d_ff=96", "model.n_layers=4", "model.vocab_size=259",
                             "data.tokenizer=byte"])
    paths = {}
    for bits in (0, 2):
        paths[bits] = str(tmp_path / f"bits{bits}")
        write_synthetic_model_dir(paths[bits], cfg, seed=0, shared_bits=bits, group_size=32,
                                  log=lambda *_: None)
    manifest = read_manifest(paths[2])
    assert manifest["shared"]["bits"] == 2 and len(manifest["shared"]["quantized"]) > 0
    assert all(q["method"] == "rtn" for q in manifest["shared"]["quantized"])
    packed, floats = (StreamingEngine(paths[2], EngineOptions(host_budget_mb=1)) for _ in range(2))
    plain = StreamingEngine(paths[0], EngineOptions(host_budget_mb=1))
    assert packed.shared_bytes < 0.5 * plain.shared_bytes

    def expand(leaf):
        if not isinstance(leaf, QuantizedKernel):
            return leaf
        q = gptq.QuantizedMatrix(np.asarray(leaf.codes), np.asarray(leaf.scales),
                                 np.asarray(leaf.zeros), (leaf.n_in, leaf.codes.shape[1]),
                                 leaf.bits, leaf.group_size)
        return jnp.asarray(gptq.dequantize(q).reshape(leaf.shape))
    floats.layer_params = jax.tree.map(expand, floats.layer_params,
                                       is_leaf=lambda a: isinstance(a, QuantizedKernel))
    rng = np.random.default_rng(3)
    prompt, steps = rng.integers(0, 259, 12), rng.integers(0, 259, 6)
    state_p, state_f, state_0 = packed.new_state(), floats.new_state(), plain.new_state()
    for toks in [prompt, *([t] for t in steps)]:
        got, state_p = packed.forward(np.asarray(toks), state_p)
        want, state_f = floats.forward(np.asarray(toks), state_f)
        unquantised, state_0 = plain.forward(np.asarray(toks), state_0)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        assert np.abs(got - unquantised).max() > 1e-3       # the codes were really used
    for engine in (packed, floats, plain):
        engine.close()


def test_delta_into_a_slot_never_writes_the_host_copy_it_came_from():
    """On CPU an aligned host region is aliased by the slot (no copy); the delta
    scatter donates the slot — the host cache's bytes must stay as they were."""
    from perspective_jax.infer import expert_store
    from perspective_jax.infer.device_slots import DeviceSlots
    host = expert_store._aligned_empty(1 << 14, expert_store.ARRAY_ALIGN)
    host[:] = 5
    slots = DeviceSlots(2, host.size, jax.devices()[0])
    slots.load(0, (0, 1), host)
    slots.apply_delta(0, (0, 2), np.array([3, 10], np.uint32), np.array([9, 9], np.uint8))
    np.testing.assert_array_equal(np.asarray(slots.arrays[0])[[2, 3, 10]], [5, 9, 9])
    assert (host == 5).all()


def test_device_slots_never_hold_more_regions_than_slots():
    """Refilling a slot drops its old region before the new one is allocated, and a
    delta rewrites it in place: counted from the arrays actually alive."""
    from perspective_jax.infer.device_slots import DeviceSlots
    slots = DeviceSlots(2, 1 << 12, jax.devices()[0])
    for i in range(6):
        slots.load(i % 2, (0, i), np.full(1 << 12, i, np.uint8))
        slots.apply_delta(i % 2, (0, i + 10), np.array([7], np.uint32), np.array([i], np.uint8))
        assert slots.regions_peak <= 2, f"refill {i}: {slots.regions_peak} regions alive"
    assert slots.keys == [(0, 14), (0, 15)]
    np.testing.assert_array_equal(np.asarray(slots.arrays[1])[6:9], [5, 5, 5])
    waited = []

    class Fence:                              # the last computation reading slot 1
        def block_until_ready(self):
            waited.append(slots.arrays[1] is not None)   # its region is still there
    slots.fence(1, Fence())
    slots.load(1, (0, 9), np.zeros(1 << 12, np.uint8))
    slots.load(1, (0, 8), np.zeros(1 << 12, np.uint8))
    assert waited == [True]                   # waited once, before the region was freed
    kept = slots.arrays[0]                    # a region still referenced elsewhere counts
    slots.load(0, (1, 0), np.zeros(1 << 12, np.uint8))
    assert slots.regions_peak == 3
    del kept


def test_host_cache_budget_and_frequency_weighted_eviction():
    priors = np.array([[0.7, 0.1, 0.1, 0.1]])
    cache = HostCache(budget_bytes=250, entry_bytes=100, priors=priors)
    assert cache.capacity == 2
    assert cache.warm(lambda j, e: np.full(100, e, np.uint8)) == 2
    assert (0, 0) in cache and len(cache) == 2
    for e in (2, 3, 1, 2):
        if cache.get((0, e)) is None:
            assert cache.reserve()
            cache.admit((0, e), np.full(100, e, np.uint8), True)
        assert cache.bytes_held <= cache.budget_bytes
    assert (0, 0) in cache                  # the frequent expert survives the churn
    assert cache.peak_bytes <= 250 and cache.evictions >= 2


def test_budgets_are_enforced_with_clear_errors(exported):
    _, _, path = exported
    with pytest.raises(UserError, match="host-budget-mb .* cannot hold one expert region"):
        StreamingEngine(path, EngineOptions(host_budget_mb=0.001))
    with pytest.raises(UserError, match="device-budget-mb .* too small"):
        StreamingEngine(path, EngineOptions(host_budget_mb=1, device_budget_mb=0.01))
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1, device_budget_mb=64))
    assert engine.device_bytes_needed <= 64 * 2**20
    region, needed = engine.store.alloc_bytes, engine.device_bytes_needed
    # the largest call's temporaries (XLA's own count) are part of the budget
    assert engine.workspace_bytes > 0 and needed == (engine.shared_bytes + engine.state_bytes
                                                     + 2 * engine.region_bytes
                                                     + engine.workspace_bytes)
    engine.close()
    with pytest.raises(UserError, match="workspace"):
        StreamingEngine(path, EngineOptions(host_budget_mb=1,
                                            device_budget_mb=(needed - 1) / 2**20))
    # a pinned tier also budgets the read buffers in flight (the one being read and
    # those queued to be pinned): one region alone no longer fits
    with pytest.raises(UserError, match=r"cannot hold one expert region .* plus .* read "
                                        r"buffers in flight"):
        StreamingEngine(path, EngineOptions(host_budget_mb=region / 2**20,
                                            host_memory_kind="pinned_host"))
    from perspective_jax.infer.expert_tiers import MAX_QUEUED_ADMISSIONS
    for transfer_thread in (False, True):        # a transfer thread: two more buffers
        fits = (MAX_QUEUED_ADMISSIONS + 2 + 2 * transfer_thread) * region / 2**20
        engine = StreamingEngine(path, EngineOptions(host_budget_mb=fits,
                                                     host_memory_kind="pinned_host",
                                                     transfer_thread=transfer_thread))
        assert engine.host.capacity == 1 and engine.host.bytes_held <= engine.host.budget_bytes
        engine.close()
        with pytest.raises(UserError, match="read buffers in flight"):
            StreamingEngine(path, EngineOptions(host_budget_mb=fits - 0.01,
                                                host_memory_kind="pinned_host",
                                                transfer_thread=transfer_thread))


def test_model_dir_errors(exported_writable, tmp_path):
    _, _, path = exported_writable
    with pytest.raises(md.ModelDirError, match="does not exist"):
        read_manifest(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(md.ModelDirError, match="no manifest.json"):
        read_manifest(str(tmp_path / "empty"))
    manifest_path = os.path.join(path, md.MANIFEST)
    manifest = json.load(open(manifest_path))
    json.dump({**manifest, "format_version": 99}, open(manifest_path, "w"))
    with pytest.raises(md.ModelDirError, match="format version 99 is not supported"):
        read_manifest(path)
    json.dump(manifest, open(manifest_path, "w"))
    os.remove(os.path.join(path, md.delta_file(0)))
    with pytest.raises(md.ModelDirError, match="deltas/layer_000.bin listed in the manifest is "
                                               "missing"):
        read_manifest(path)


def test_export_is_atomic_and_refuses_to_overwrite(tmp_path, small_cfg, monkeypatch):
    from perspective_jax.export import stream
    cfg = routed_cfg(small_cfg)
    params = init_params(cfg.model, jax.random.key(0), moe=cfg.moe)
    path = export_model(tmp_path, cfg, params)
    with pytest.raises(UserError, match="already exists; pass --force"):
        export_model(tmp_path, cfg, params)

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(stream.TensorFile, "close", boom)
    with pytest.raises(RuntimeError):
        export_model(tmp_path, cfg, params, name="broken")
    assert not (tmp_path / "broken").exists()
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]
    read_manifest(path)                             # the earlier export is untouched


def test_gptq_shared_weights_round_trip_through_the_model_dir(tmp_path, small_cfg):
    """--shared-bits: the engine computes with exactly the dequantised GPTQ kernels."""
    from perspective_jax.export.calibrate import dequantize_shared, replace_shared
    from perspective_jax.quant.quantized_kernel import QuantizedKernel
    from safetensors.numpy import load_file
    cfg = routed_cfg(small_cfg)
    params = init_params(cfg.model, jax.random.key(0), moe=cfg.moe)
    calib = np.random.default_rng(0).integers(0, 259, (1, 64)).astype(np.int32)
    path = export_model(tmp_path, cfg, params, calib=calib, shared_bits=4, group_size=16)
    manifest = read_manifest(path)
    assert manifest["shared"]["bits"] == 4 and manifest["shared"]["quantized"]
    assert all(q["rel_error"] <= q["rel_error_rtn"] + 1e-6
               for q in manifest["shared"]["quantized"])
    stored = load_file(os.path.join(path, md.SHARED_FILE))
    kernels = dequantize_shared(stored)
    assert len(kernels) == len(manifest["shared"]["quantized"])
    # a quantised export writes the embedding int8 with row scales (SPEC §3.4)
    assert manifest["shared"]["embedding"] == "int8"
    table = embedding_int8.dequantize(stored["embed/embedding"],
                                      stored["embed/embedding.scale"])
    dequantised = with_embedding(replace_shared(params, kernels), table)
    prompt, steps = np.arange(5, 25), np.arange(30, 38)
    ref = reference_logits(cfg, dequantised, prompt, steps)
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1))
    # the engine computes from the packed codes: every quantised kernel stays a
    # QuantizedKernel on the device, and the device bytes count codes, not floats
    held = [leaf for layer in engine.layer_params for lp in layer
            for leaf in jax.tree.leaves(lp, is_leaf=lambda a: isinstance(a, QuantizedKernel))
            if isinstance(leaf, QuantizedKernel)]
    assert len(held) == len(kernels)
    f32_bytes = sum(4 * int(np.prod(k.shape)) for k in held)
    assert sum(k.nbytes for k in held) < f32_bytes / 3
    meta = (".shape", ".bits", ".group_size", ".orig_shape")
    assert engine.shared_bytes == sum(v.nbytes for k, v in stored.items()
                                      if not k.endswith(meta))
    assert_engine_matches(engine, ref, prompt, steps)
    engine.close()


def test_infer_cli_errors_are_one_line(exported_writable, tmp_path, capsys):
    from perspective_jax.cli import infer
    _, _, path = exported_writable
    cases = [
        (["--model-dir", path, ""], "the prompt is empty"),
        (["--model-dir", str(tmp_path / "missing"), "hi"], "does not exist"),
        (["--model-dir", path, "hi", "--top-p", "0"], "--top-p: must lie in (0, 1]"),
        (["--model-dir", path, "hi", "--host-budget-mb", "0.0001"], "cannot hold one expert"),
        (["--model-dir", path, "hi", "--resume-state", str(tmp_path / "none.state")],
         "no such file"),
    ]
    for argv, message in cases:
        assert infer.run(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    with open(os.path.join(path, md.SHARED_FILE), "r+b") as fh:   # corrupt shared weights
        fh.seek(-3, 2)
        fh.write(b"xyz")
    assert infer.run(["--model-dir", path, "hi"]) == 2
    assert "shared.safetensors fails its sha256 checksum" in capsys.readouterr().err


def test_infer_cli_streams_and_stops_at_stop_string(exported, capsys):
    from perspective_jax.cli import infer
    _, _, path = exported
    assert infer.run(["--model-dir", path, "ab", "--max-tokens", "12", "--temperature", "0"]) == 0
    full = capsys.readouterr().out[len("ab"):].rstrip("\n")
    assert len(full) > 0
    # the first two whole characters: streamed text must not show the stop's start
    k = next(k for k in range(len(full) - 1) if "\ufffd" not in full[k: k + 2])
    stop = full[k: k + 2]
    assert infer.run(["--model-dir", path, "ab", "--max-tokens", "12", "--temperature", "0",
                      "--stop", stop]) == 0
    cut = capsys.readouterr().out[len("ab"):].rstrip("\n")
    assert cut == full[:k]
    # the same greedy text with regions copied to the device on a thread of their own
    assert infer.run(["--model-dir", path, "ab", "--max-tokens", "12", "--temperature", "0",
                      "--transfer-thread", "--io", "direct"]) == 0
    assert capsys.readouterr().out[len("ab"):].rstrip("\n") == full


def test_engine_with_per_output_feature_scales(tmp_path, small_cfg):
    cfg = routed_cfg(small_cfg, scale_granularity="row")
    params = init_params(cfg.model, jax.random.key(4), moe=cfg.moe)
    path = export_model(tmp_path, cfg, params)
    prompt, steps = np.arange(40, 52), np.arange(60, 66)
    ref = reference_logits(cfg, params, prompt, steps)
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1))
    assert_engine_matches(engine, ref, prompt, steps)
    engine.close()
