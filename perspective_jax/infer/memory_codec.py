"""A memory's text codec from a model: its tokenizer, and its input rows exactly as
the streaming engine starts the residual stream (SPEC §3.7).

    codec, identity, vocab, n_layers = model_codec("models/tiny")   # no engine started
    codec, identity, vocab, n_layers = engine_codec(engine, tokenizer)  # a running one
    mf = new_memory_file(codec, MemoryParams(), identity, vocab, sample=texts)
    check_model(mf, identity, "facts.hdm")      # a file of another model: one-line error
    text_codec = codec_for(mf, codec.tokenize, codec.embed_rows)    # encodes for that file

    embed_rows(ids [T]) = compute.embed(cfg, table, ids[None])[0]    [T, d] float32
                        = table[ids] · √d      (an int8 table dequantised first)

`model_codec` reads the manifest, the tokenizer and only the embedding's tensors
of shared.safetensors (both checked against their sha256); `engine_codec` uses the
engine's own device table, so the two give the same rows bit for bit. The codec
they return has no codebook yet (`codebook` None): a memory file's codebook comes
from the file (its dimension, seed and centre), `codec_for`. Ids are padded to a
power of two before the jitted call (rows do not depend on each other), so texts
of many lengths share a few compiled programs.

A new memory's codebook centre: the mean representation of sample texts
(`text_centre`; perspective-memory uses the texts of the first `add`) or, with no
sample, the mean input row over the vocabulary (`recall.vocabulary_centre`).
Hypervectors are signs of projections of r − centre, so the centre decides how
alike unrelated texts come out; see `text_centre`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.config import ModelConfig, PerspectiveConfig
from perspective_jax.config.loader import from_dict
from perspective_jax.errors import UserError
from perspective_jax.infer import compute as L
from perspective_jax.infer.engine import load_model_tokenizer
from perspective_jax.memory.codebook import Codebook
from perspective_jax.memory.memory_file import MemoryFile, load
from perspective_jax.memory.recall import (MemoryRecall, RecallConfig, TextCodec,
                                           vocabulary_centre)
from perspective_jax.memory.store import HDMemory, MemoryParams
from perspective_jax.modeldir.manifest import model_identity, read_manifest
from perspective_jax.modeldir.shared_weights import load_embedding

MIN_BUCKET = 16             # the fewest ids one embedding call is padded to


class ModelCodec(NamedTuple):
    codec: TextCodec        # tokenize, embed_rows; codebook None (see `codec_for`)
    identity: str           # modeldir.manifest.model_identity
    vocab_size: int         # ids text can produce: min(tokenizer's, model's)
    n_layers: int


def rows_fn(cfg: ModelConfig, table) -> Callable:
    """embed_rows(ids [T]) → [T, d] float32: `compute.embed` on `table` (a device
    array or Int8Table), ids padded to a power of two ≥ MIN_BUCKET."""
    def embed_rows(ids) -> np.ndarray:
        ids = np.asarray(ids, np.int32).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
            raise UserError(f"token ids must lie in [0, {cfg.vocab_size}); got "
                            f"{int(ids.min())}..{int(ids.max())}")
        size = max(MIN_BUCKET, 1 << max(0, int(ids.size - 1).bit_length()))
        padded = np.zeros(size, np.int32)
        padded[:ids.size] = ids
        out = np.asarray(L.embed(cfg, table, jnp.asarray(padded)[None]))   # one call
        return out[0, :ids.size].astype(np.float32)
    return embed_rows


def _codec(cfg: ModelConfig, table, tokenizer, identity: str) -> ModelCodec:
    codec = TextCodec(tokenizer.encode, rows_fn(cfg, table), None)
    vocab = min(int(tokenizer.vocab_size), cfg.vocab_size)
    return ModelCodec(codec, identity, vocab, cfg.n_layers)


def model_codec(model_dir: str, manifest: Optional[dict] = None) -> ModelCodec:
    """The codec of `model_dir` without a streaming engine (module docstring)."""
    manifest = read_manifest(model_dir) if manifest is None else manifest
    parsed = getattr(manifest, "config", None)
    cfg = (parsed if parsed is not None else from_dict(PerspectiveConfig, manifest["config"]))
    table = jax.device_put(load_embedding(model_dir, manifest))
    return _codec(cfg.model, table, load_model_tokenizer(model_dir, manifest),
                  model_identity(manifest))


def engine_codec(engine, tokenizer) -> ModelCodec:
    """The same codec from a running `StreamingEngine` (its device table)."""
    return _codec(engine.model, engine.embed_table, tokenizer, engine.identity)


def codebook_for(mf: MemoryFile) -> Codebook:
    """The codebook memory file `mf` was encoded with (its dim, seed and centre)."""
    p = mf.memory.params
    return Codebook(in_dim=int(mf.centre.size), dim=p.dim, seed=p.seed, centre=mf.centre)


def codec_for(mf: MemoryFile, tokenize: Callable, embed_rows: Callable) -> TextCodec:
    """The TextCodec that encodes texts for memory file `mf`."""
    return TextCodec(tokenize, embed_rows, codebook_for(mf))


def new_memory_file(codec: TextCodec, params: MemoryParams, identity: str,
                    vocab_size: int, sample=None) -> MemoryFile:
    """An empty memory for a model; its codebook centre is `new_centre`."""
    return MemoryFile(HDMemory.new(params), new_centre(codec, vocab_size, sample), identity)


def new_centre(codec: TextCodec, vocab_size: int, sample=None) -> np.ndarray:
    """The codebook centre of a new memory [d]: the mean representation of the
    `sample` texts when given (`text_centre`), else the mean input row over the
    vocabulary (`recall.vocabulary_centre`)."""
    if sample:
        return text_centre(codec, sample)
    return vocabulary_centre(codec.embed_rows, vocab_size)


def text_centre(codec: TextCodec, texts) -> np.ndarray:
    """mean_i r(text_i) [d] float32 — the centre of what texts look like. Every text's
    r is a mean of rows over its tokens, so texts share a large common part, and
    centred on the vocabulary mean unrelated texts get hypervectors ≈ 0.8 alike (on
    the test model: 0.82 between eight unrelated facts, 0.60 centred on the facts
    themselves; docs/memory.md): alike keys crowd into the same banks."""
    return centre_of([codec.represent(t) for t in texts])


def centre_of(reps) -> np.ndarray:
    """The mean [d] float32 of representations r [d] (float64 sums)."""
    return np.stack(reps).astype(np.float64).mean(0).astype(np.float32)


def check_model(mf: MemoryFile, identity: str, path: str) -> None:
    """A one-line UserError unless memory file `path` was built with this model."""
    if mf.model == identity:
        return
    if mf.model is None:
        raise UserError(f"memory {path} records no model; it cannot be read with a model's "
                        "codec (build it with perspective-memory --model-dir)")
    raise UserError(f"memory {path} was built with another model; its keys are encoded "
                    f"by that model's embedding (model {mf.model[:12]}…, this one "
                    f"{identity[:12]}…) — use that model directory or build a new memory")


def engine_recall(engine, tokenizer, path: str, cfg: RecallConfig) -> MemoryRecall:
    """The recall `perspective-infer --memory` and `perspective-serve --memory` consult:
    memory file `path` (checked against the engine's model), its codec on the engine's
    own embedding, re-read by `MemoryRecall.refresh` when the file is replaced."""
    mf = load(path)
    check_model(mf, engine.identity, path)
    codec = engine_codec(engine, tokenizer)
    text = codec_for(mf, codec.codec.tokenize, codec.codec.embed_rows)

    def reload(p: str) -> MemoryFile:
        fresh = load(p)
        check_model(fresh, engine.identity, p)
        return fresh
    return MemoryRecall(mf, text, cfg, codec.n_layers, path=path, reload=reload)
