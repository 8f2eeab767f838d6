"""Shared pieces of the safety-stage tests: a tiny align-like run written directly (no
training: random weights, a checkpoint at its last step, a byte tokenizer and a token
store of real text), and the safety settings that keep the stage fast."""

import dataclasses
import inspect
import pathlib

import jax

from perspective_jax.config import ModelConfig, load_config
from perspective_jax.data.byte_tokenizer import ByteTokenizer
from perspective_jax.data.corpus import Document, split_documents
from perspective_jax.data.token_store import build_token_store
from perspective_jax.model.transformer import init_params
from perspective_jax.rundir.checkpoint import Checkpointer
from perspective_jax.rundir.layout import save_run_config
from perspective_jax.train.resume import check_data_record
from perspective_jax.train.stages import stage_config
from perspective_jax.train.step import init_state, make_optimizer

# the stage on a few hundred states: k-means and the polytope stay small
FAST = ["safety.max_states=1024", "safety.anchors=32", "safety.pca_directions=8",
        "safety.random_directions=8"]


def corpus_documents() -> list[Document]:
    """A few modules of Python's standard library (real code, as the tiny runs train on)."""
    import argparse
    import difflib
    import textwrap
    return [Document(inspect.getsourcefile(m), pathlib.Path(inspect.getsourcefile(m))
                     .read_text()) for m in (argparse, difflib, textwrap)]


def tiny_run(path, model: ModelConfig, stage: str = "align", seed: int = 0) -> str:
    """A run directory as `stage` leaves it (config, tokenizer, data record and token
    store, one checkpoint at train.steps), holding a randomly initialised `model`
    (vocab 259: bytes; its initialisation is the `exported` fixture's, so compiled once)."""
    from conftest import train_overrides
    cfg = load_config(None, train_overrides(**{"train.steps": 2}))
    cfg = stage_config(dataclasses.replace(cfg, model=dataclasses.replace(
        model, vocab_size=259)), stage)
    run = pathlib.Path(path)
    run.mkdir(parents=True)
    (run / "tokenizer.byte").write_text("utf-8 bytes\n")
    train_docs, val_docs = split_documents(corpus_documents(), cfg.data.val_fraction)
    train_split, _ = build_token_store(str(run), train_docs, val_docs, ByteTokenizer())
    check_data_record(str(run), train_split.store, "--data stdlib modules", resuming=False)
    save_run_config(cfg, str(run))
    params = init_params(cfg.model, jax.random.key(seed), moe=cfg.moe)
    ckpt = Checkpointer(str(run), dataclasses.replace(cfg.checkpoint, async_save=False))
    ckpt.save(cfg.train.steps, init_state(params, make_optimizer(cfg.train)), None,
              {"stage": stage}, force=True)
    ckpt.close()
    return str(run)
