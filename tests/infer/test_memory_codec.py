"""A memory's codec from a model directory: the same rows and hypervectors as a running
engine's, the embedding × √d reference, and a memory bound to its model."""

import math

import jax
import numpy as np
import pytest

from perspective_jax.errors import UserError
from perspective_jax.infer.engine import StreamingEngine, load_model_tokenizer
from perspective_jax.infer.memory_codec import (check_model, codec_for, engine_codec,
                                                model_codec, new_memory_file)
from perspective_jax.infer.options import EngineOptions
from perspective_jax.memory.store import MemoryParams
from perspective_jax.model.transformer import init_params
from perspective_jax.modeldir.manifest import model_identity, read_manifest
from perspective_jax.quant import embedding_int8 as e8
from streaming_helpers import export_model, routed_cfg

PARAMS = MemoryParams(dim=1024, n_banks=8, seed=3)
TEXTS = ["the capital of Zorbin", "Quartzville", "a", "x" * 37, "héllo wörld ✓"]


def _engine_codec(path):
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1))
    return engine, engine_codec(engine, load_model_tokenizer(path))


def test_model_codec_equals_the_engines_and_the_embedding_reference(exported):
    cfg, params, path = exported
    mc = model_codec(path)
    engine, ec = _engine_codec(path)
    try:
        assert mc.identity == ec.identity == engine.identity == model_identity(
            read_manifest(path))
        assert (mc.vocab_size, mc.n_layers) == (ec.vocab_size, ec.n_layers) == (
            259, cfg.model.n_layers)
        table = np.asarray(params["embed"]["embedding"], np.float32)
        ids = np.array([0, 5, 258, 5, 17], np.int32)
        rows = mc.codec.embed_rows(ids)
        assert rows.shape == (5, cfg.model.d_model) and rows.dtype == np.float32
        np.testing.assert_array_equal(rows, ec.codec.embed_rows(ids))
        np.testing.assert_allclose(rows, table[ids] * math.sqrt(cfg.model.d_model),
                                   rtol=1e-6)
        with pytest.raises(UserError, match="token ids"):
            mc.codec.embed_rows(np.array([259]))
        mf = new_memory_file(mc.codec, PARAMS, mc.identity, mc.vocab_size)
        np.testing.assert_allclose(mf.centre, table.mean(0) * math.sqrt(cfg.model.d_model),
                                   rtol=1e-5, atol=1e-6)
        assert mf.model == mc.identity and len(mf.memory) == 0
        a = codec_for(mf, mc.codec.tokenize, mc.codec.embed_rows)
        b = codec_for(mf, ec.codec.tokenize, ec.codec.embed_rows)
        for text in TEXTS:
            np.testing.assert_array_equal(a.encode(text), b.encode(text))
        # the reference: sign of the centred mean row against the seeded projection
        r = table[np.frombuffer(TEXTS[0].encode(), np.uint8)].mean(0) * math.sqrt(32)
        bits = ((r - mf.centre) @ a.codebook.projection()) > 0
        agree = np.mean(bits == np.unpackbits(a.encode(TEXTS[0]).view(np.uint8),
                                              bitorder="little")[:PARAMS.dim])
        assert agree > 0.99            # float rounding may flip a bit near the plane
    finally:
        engine.close()


def test_an_int8_model_codec_equals_the_engines(tmp_path, small_cfg):
    cfg = routed_cfg(small_cfg)
    params = jax.tree.map(np.asarray, init_params(cfg.model, jax.random.key(4), moe=cfg.moe))
    path = export_model(tmp_path, cfg, params, name="int8", embedding="int8")
    mc = model_codec(path)
    engine, ec = _engine_codec(path)
    try:
        ids = np.arange(0, 259, 7, dtype=np.int32)
        rows = mc.codec.embed_rows(ids)
        np.testing.assert_array_equal(rows, ec.codec.embed_rows(ids))
        codes, scale = e8.quantize(params["embed"]["embedding"])
        np.testing.assert_allclose(rows, e8.dequantize(codes, scale)[ids] * math.sqrt(32),
                                   rtol=1e-6, atol=1e-7)
    finally:
        engine.close()


def test_a_memory_of_one_model_is_refused_for_another(exported, exported_distinct):
    _, _, one = exported
    _, _, other = exported_distinct
    mc, mc_other = model_codec(one), model_codec(other)
    assert mc.identity != mc_other.identity
    mf = new_memory_file(mc.codec, PARAMS, mc.identity, mc.vocab_size)
    check_model(mf, mc.identity, "facts.hdm")
    with pytest.raises(UserError, match="memory facts.hdm was built with another model") as e:
        check_model(mf, mc_other.identity, "facts.hdm")
    assert "\n" not in str(e.value)
    mf.model = None
    with pytest.raises(UserError, match="records no model"):
        check_model(mf, mc.identity, "facts.hdm")


def test_a_text_centre_keeps_unrelated_texts_apart(exported):
    """Centred on the vocabulary mean every text's mean row shares a large common part
    and unrelated keys come out alike; centred on texts they are far less alike."""
    from perspective_jax.memory import hypervector as hv
    cfg, params, path = exported
    mc = model_codec(path)
    keys = ["the capital of Zorbin is", "the inventor of the glass piano was",
            "the number of moons around Kessel", "the name of the captain's parrot",
            "the colour of the royal banner", "the password for the old lighthouse"]
    table = np.asarray(params["embed"]["embedding"], np.float32) * math.sqrt(32)
    ref = np.mean([table[np.frombuffer(k.encode(), np.uint8)].mean(0) for k in keys], 0)
    by_text = new_memory_file(mc.codec, PARAMS, mc.identity, mc.vocab_size, sample=keys)
    np.testing.assert_allclose(by_text.centre, ref, rtol=1e-5, atol=1e-6)
    by_vocab = new_memory_file(mc.codec, PARAMS, mc.identity, mc.vocab_size)

    def alike(mf):
        codec = codec_for(mf, mc.codec.tokenize, mc.codec.embed_rows)
        k = np.stack([codec.encode(t) for t in keys])
        sim = 1 - hv.hamming_table(k, k) / PARAMS.dim
        return sim[~np.eye(len(keys), dtype=bool)].mean()
    assert alike(by_text) < alike(by_vocab) - 0.1


def test_a_damaged_model_directory_is_refused_before_its_embedding_is_read(
        exported_writable):
    from perspective_jax.modeldir import format as md
    _, _, path = exported_writable
    shared = f"{path}/{md.SHARED_FILE}"
    data = bytearray(open(shared, "rb").read())
    data[len(data) // 2] ^= 1
    open(shared, "wb").write(bytes(data))
    with pytest.raises(UserError, match="fails its sha256 checksum") as err:
        model_codec(path)
    assert "\n" not in str(err.value)
