"""Shared pieces of the safety tests: a tiny align-like run written directly (no
training: random weights, a checkpoint at its last step, a byte tokenizer and a token
store of real text) and the settings that keep the safety stage fast; a polytope built
in-test for an exported model's own head (support half-spaces through its final
states, flagged rows capping chosen tokens), and the model directory's loader pointed
at it."""

import contextlib
import dataclasses
import inspect
import pathlib

import jax
import numpy as np
import pytest

from perspective_jax.config import ModelConfig, load_config
from perspective_jax.data.byte_tokenizer import ByteTokenizer
from perspective_jax.data.corpus import Document, split_documents
from perspective_jax.data.token_store import build_token_store
from perspective_jax.infer import polytope_loader
from perspective_jax.model.transformer import init_params
from perspective_jax.rundir.checkpoint import Checkpointer
from perspective_jax.rundir.layout import save_run_config
from perspective_jax.safety.flags import FlagRules
from perspective_jax.safety.polytope import Polytope
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


def tiny_run(path, model: ModelConfig, stage: str = "align", seed: int = 0,
             shape_params=None) -> str:
    """A run directory as `stage` leaves it (config, tokenizer, data record and token
    store, one checkpoint at train.steps), holding a randomly initialised `model`
    (vocab 259: bytes; its initialisation is the `exported` fixture's, so compiled once).
    `shape_params(params, cfg)`, if given, changes or places the params before the save."""
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
    if shape_params is not None:
        params = shape_params(params, cfg)
    ckpt = Checkpointer(str(run), dataclasses.replace(cfg.checkpoint, async_save=False))
    ckpt.save(cfg.train.steps, init_state(params, make_optimizer(cfg.train)), None,
              {"stage": stage}, force=True)
    ckpt.close()
    return str(run)


LOOSE_BOUND = 1e3
TOK = ByteTokenizer()
FLAG = "00"          # the plain exported model continues "abc" with "\x01" then "0000…"
ELICIT = "abc"
PROMPTS = ("def main(", "hello", ELICIT, "x = 1\n", "import os")


def head_and_states(engine):
    """(the engine's float head table [V, d], the final states of PROMPTS [N, d])."""
    table = np.asarray(engine.embed_table, np.float32)
    logits = [engine.forward(TOK.encode(p), engine.new_state(), all_logits=True)[0]
              for p in PROMPTS]
    return table, final_states(np.concatenate(logits), table)


def final_states(logits, table) -> np.ndarray:
    """The final states xn [N, d] behind logits [N, V] = xn · tableᵀ (least squares:
    the tied head of a small model has full column rank)."""
    x, *_ = np.linalg.lstsq(np.asarray(table, np.float64),
                            np.asarray(logits, np.float64).T, rcond=None)
    return x.T


def make_polytope(table, states, flagged, appended, n_support=6, quantile=0.8,
                  cap_above=0.5, seed=0) -> Polytope:
    """Support rows: `n_support` random unit directions n with bound the `quantile`
    quantile of n·x over `states` (so some states lie outside and are moved), or with
    `quantile=None` a bound no state reaches (|x| is far below LOOSE_BOUND); the
    interior point is the states' mean; each flagged token's cap is its logit there
    plus `cap_above`."""
    table = np.asarray(table, np.float64)
    states = np.asarray(states, np.float64)
    rng = np.random.default_rng(seed)
    normals = rng.normal(size=(n_support, table.shape[1]))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    bounds = (np.full(n_support, LOOSE_BOUND) if quantile is None
              else np.quantile(states @ normals.T, quantile, axis=0))
    centre = states.mean(axis=0)
    assert np.all(normals @ centre < bounds)
    tokens = FlagRules.build(flagged, appended).token_ids
    caps = table[tokens] @ centre + cap_above
    return Polytope(normals.astype(np.float32), bounds.astype(np.float32), 0.0,
                    tuple(flagged), tokens, caps.astype(np.float32),
                    centre.astype(np.float32), {"max_iters": 64})


@contextlib.contextmanager
def model_has(polytope):
    """Every model directory's loader answers `polytope` (None: no polytope)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(polytope_loader, "load_model_polytope", lambda *_: polytope)
        yield
