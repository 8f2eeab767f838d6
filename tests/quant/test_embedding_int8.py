"""The int8 tied embedding/head (SPEC §3.4): quantisation against a float64 reference,
the blocked head against a plain matmul, and the streaming engine on an int8 export
against the in-memory model with the dequantised table."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from perspective_jax.quant import embedding_int8 as e8
from perspective_jax.modeldir import format as md
from perspective_jax.modeldir.manifest import read_manifest
from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.options import EngineOptions
from perspective_jax.export.exporter import with_embedding
from perspective_jax.model.transformer import init_params
from streaming_helpers import assert_engine_matches, export_model, reference_logits, routed_cfg


def test_row_absmax_quantisation_against_float64():
    rng = np.random.default_rng(0)
    table = rng.normal(0, 0.05, (37, 24)).astype(np.float32)
    table[3] = 0.0                                          # a dead row
    table[5, 7] = -4.0                                      # an outlier owns its row's scale
    codes, scale = e8.quantize(table)
    assert codes.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (37,)
    t64 = table.astype(np.float64)
    want = np.abs(t64).max(1) / 127
    np.testing.assert_allclose(scale, want, rtol=1e-6)
    assert scale[3] == 0 and not codes[3].any()
    live = np.arange(37) != 3
    assert np.all(np.abs(codes[live]).max(1) == 127) and np.abs(codes).max() <= 127
    err = np.abs(e8.dequantize(codes, scale).astype(np.float64) - t64)
    assert np.all(err <= want[:, None] * (0.5 + 1e-4))      # round to nearest step
    assert codes[5, 7] == -127
    with pytest.raises(ValueError, match=r"\[V, d\]"):
        e8.quantize(table[0])


@pytest.mark.parametrize("block_rows", [1, 7, 37, 4096])
def test_blocked_head_and_embed_equal_the_dequantised_table(block_rows):
    rng = np.random.default_rng(1)
    codes, scale = e8.quantize(rng.normal(0, 1, (37, 16)).astype(np.float32))
    ref = e8.dequantize(codes, scale).astype(np.float64)
    table = e8.blocked(codes, scale, block_rows)
    n_blocks = -(-37 // block_rows)                  # fewest blocks, balanced
    rows = -(-37 // n_blocks)
    assert table.codes.shape == (n_blocks, rows, 16) and n_blocks * rows - 37 < n_blocks
    assert rows <= block_rows
    x = rng.normal(0, 1, (3, 16)).astype(np.float32)
    logits = jax.jit(e8.head_logits, static_argnums=2)(table, jnp.asarray(x), 37)
    np.testing.assert_allclose(np.asarray(logits), x.astype(np.float64) @ ref.T,
                               rtol=1e-5, atol=1e-5)
    tokens = np.array([[0, 36, 5], [17, 17, 2]])
    got = e8.embed_rows(table, jnp.asarray(tokens), jnp.float32)
    np.testing.assert_array_equal(np.asarray(got), ref[tokens].astype(np.float32))
    with pytest.raises(ValueError, match="block_rows"):
        e8.blocked(codes, scale, 0)


def test_check_names_what_is_wrong():
    codes, scale = e8.quantize(np.ones((4, 3), np.float32))
    assert e8.check(codes, scale, 4, 3) is None
    assert "expected int8 [5, 3]" in e8.check(codes, scale, 5, 3)
    assert "expected int8" in e8.check(codes.astype(np.int16), scale, 4, 3)
    assert "float32 [4]" in e8.check(codes, scale[:3], 4, 3)
    assert "finite" in e8.check(codes, np.full(4, np.nan, np.float32), 4, 3)


def test_engine_on_an_int8_export_equals_the_model_with_the_dequantised_table(
        tmp_path, small_cfg, monkeypatch):
    cfg = routed_cfg(small_cfg)
    params = jax.tree.map(np.asarray, init_params(cfg.model, jax.random.key(0), moe=cfg.moe))
    path = export_model(tmp_path, cfg, params, name="int8", embedding="int8")
    manifest = read_manifest(path)
    assert manifest["shared"]["embedding"] == "int8"
    assert manifest["shared"]["tensors"]["embed/embedding"]["dtype"] == "int8"
    codes, scale = e8.quantize(params["embed"]["embedding"])
    ref = reference_logits(cfg, with_embedding(params, e8.dequantize(codes, scale)),
                           np.arange(5, 25), np.arange(30, 40))
    monkeypatch.setattr(e8, "BLOCK_ROWS", 100)      # 259 rows: 3 blocks of 87, 2 padded
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1))
    table, d = engine.embed_table, cfg.model.d_model
    assert table.codes.shape == (3, 87, d) and table.codes.dtype == jnp.int8
    # the device holds int8 codes + padding + row scales, not a float table
    others = sum(v.nbytes for k, v in load_file(os.path.join(path, md.SHARED_FILE)).items()
                 if not k.startswith("embed/"))
    assert engine.shared_bytes == others + 261 * d + 4 * 261
    assert_engine_matches(engine, ref, np.arange(5, 25), np.arange(30, 40))
    engine.close()


def test_int8_manifest_errors_and_older_formats_are_refused(exported_writable, tmp_path,
                                                            small_cfg):
    cfg = routed_cfg(small_cfg)
    params = init_params(cfg.model, jax.random.key(0), moe=cfg.moe)
    path = export_model(tmp_path, cfg, params, name="int8", embedding="int8")
    manifest_path = os.path.join(path, md.MANIFEST)
    manifest = json.load(open(manifest_path))
    for edit, message in (
            (lambda m: m["shared"].update(embedding="int4"), "embedding format 'int4'"),
            (lambda m: m["shared"]["tensors"].pop("embed/embedding.scale"),
             "no embed/embedding.scale"),
            (lambda m: m["shared"].update(embedding="float32"),    # the index says int8
             r"embed/embedding is int8 \[259, 32\], expected float")):
        broken = json.loads(json.dumps(manifest))
        edit(broken)
        json.dump(md.seal_manifest(broken), open(manifest_path, "w"))
        with pytest.raises(md.ModelDirError, match=message):
            read_manifest(path)
    # an export written before the manifest checksum (version 3 or 4) cannot be verified
    _, _, old = exported_writable
    old_path = os.path.join(old, md.MANIFEST)
    old_manifest = json.load(open(old_path))
    old_manifest["format_version"] = 3
    del old_manifest["shared"]["embedding"], old_manifest[md.MANIFEST_CHECKSUM]
    json.dump(old_manifest, open(old_path, "w"))
    with pytest.raises(md.ModelDirError, match="format version 3 has no checksum .* re-export"):
        StreamingEngine(old, EngineOptions(host_budget_mb=1))
