"""In-memory generation for evaluation: prefill once, then cached decode steps.

    tokens = generate(cfg, params, prompt_ids, max_new_tokens=64,
                      sampling=Sampling(temperature=0.8, top_k=40), seed=0,
                      n_valid=tokenizer.vocab_size)

Sampling: greedy (temperature 0), temperature, top-k and top-p (nucleus), never an id
>= n_valid (one the tokenizer does not have; `model.sampling`).

    tokens, steps = generate_mpd(cfg, params, prompt_ids, 64, MPDConfig(), moe=moe)

decodes with Multi-Perspective Decoding (`model.mpd`): each step's `MPDStep` holds
the emitted token's confidence and whether MPD triggered.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.config import ModelConfig, MoEConfig
from perspective_jax.config.schema import MPDConfig
from perspective_jax.errors import UserError
from perspective_jax.model.extensions import Extensions
from perspective_jax.model.mpd import PERSPECTIVES, MPDStep, mpd_step, tiled_step, views_step
from perspective_jax.model.sampling import Sampling, sample_next
from perspective_jax.model.transformer import PerspectiveLM, init_cache


@functools.lru_cache(maxsize=8)
def _compiled(cfg: ModelConfig, moe: MoEConfig, activation_bits: int = 0):
    """Jitted (prefill, step) for one model config, compiled once per shape."""
    model = PerspectiveLM(cfg, moe, activation_bits=activation_bits)

    @jax.jit
    def prefill(p, tokens, cache):
        logits, cache = model.apply({"params": p}, tokens, cache=cache)
        return logits[:, -1], cache

    @jax.jit
    def step(p, token, cache):
        logits, cache = model.apply({"params": p}, token[:, None], cache=cache)
        return logits[:, -1], cache

    return prefill, step


def generate(cfg: ModelConfig, params, prompt: np.ndarray, max_new_tokens: int,
             sampling: Sampling = Sampling(), seed: int = 0,
             eos_id: Optional[int] = None, moe: MoEConfig = MoEConfig(),
             activation_bits: int = 0, n_valid: Optional[int] = None) -> np.ndarray:
    """prompt [B, T0] int → generated continuation [B, ≤ max_new_tokens], every id
    < n_valid (the tokenizer's piece count; None = the whole vocabulary).
    `activation_bits=8`: int8 expert activations, as the ternary stage trains."""
    prompt = _checked_prompt(cfg, prompt, max_new_tokens)
    prefill, step = _compiled(cfg, moe, activation_bits)
    rng = jax.random.key(seed)
    logits, cache = prefill(params, jnp.asarray(prompt), init_cache(cfg, prompt.shape[0]))
    out = []
    done = np.zeros(prompt.shape[0], dtype=bool)
    for _ in range(max_new_tokens):
        rng, sub = jax.random.split(rng)
        token = sample_next(logits, sub, sampling, n_valid)
        out.append(np.asarray(token))
        if eos_id is not None:
            done |= out[-1] == eos_id
            if done.all():
                break
        logits, cache = step(params, token, cache)
    return np.stack(out, axis=1)


def _checked_prompt(cfg: ModelConfig, prompt, max_new_tokens: int) -> np.ndarray:
    prompt = np.asarray(prompt, dtype=np.int32)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise UserError("prompt must be a non-empty [batch, tokens] array of ids")
    if max_new_tokens <= 0:
        raise UserError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if prompt.min() < 0 or prompt.max() >= cfg.vocab_size:
        raise UserError(f"prompt ids must lie in [0, {cfg.vocab_size})")
    return prompt


@functools.lru_cache(maxsize=8)
def _injected_step(cfg: ModelConfig, moe: MoEConfig, activation_bits: int, layer: int):
    """Jitted (params, token [B], cache, vectors [B, d]) → last logits [B, V] with
    vectors[b] added to row b's residual stream after `layer` (the cache is not kept)."""
    model = PerspectiveLM(cfg, moe, activation_bits=activation_bits)

    @jax.jit
    def step(p, token, cache, vectors):
        ext = Extensions(inject_layer=layer, inject=vectors)
        logits, _ = model.apply({"params": p}, token[:, None], cache=cache, ext=ext)
        return logits[:, -1]
    return step


def generate_mpd(cfg: ModelConfig, params, prompt: np.ndarray, max_new_tokens: int,
                 mpd: MPDConfig = MPDConfig(), sampling: Sampling = Sampling(),
                 seed: int = 0, moe: MoEConfig = MoEConfig(), activation_bits: int = 0,
                 n_valid: Optional[int] = None, recall=None
                 ) -> tuple[np.ndarray, list[MPDStep]]:
    """As `generate`, with MPD on every step: returns the tokens [B, max_new_tokens]
    and each step's `MPDStep` (token, confidence, triggered, kind, agreement).
    mpd.state "forked": P0 decodes; a triggered step runs P1..P3 on the token just
    fed from P0's state before it. "persistent": the four perspectives decode as
    one batch of 4·B rows, each with its own state, every step.

    `recall` (forked only; e.g. memory.recall.MemoryRecall): where the views find no
    majority, `recall(context ids)` → None or an object with `.vector` [d]; the
    step is run again from the same state with the vector injected after
    `recall.inject_layer`, the token drawn from those logits with the same key, and
    `recall.injected()` called. Decoding continues from P0's own state."""
    prompt = _checked_prompt(cfg, prompt, max_new_tokens)
    b, n = prompt.shape[0], len(PERSPECTIVES)
    if recall is not None and mpd.state != "forked":
        raise UserError("a memory is consulted with views forked from P0's state; use "
                        "mpd.state=forked")
    rng = jax.random.key(seed)
    steps: list[MPDStep] = []
    spent = np.zeros(b, np.int32)                  # triggers honoured so far (the budget)
    if mpd.state == "persistent":
        step4 = tiled_step(cfg, moe, PERSPECTIVES, activation_bits)
        logits4, cache = step4(params, jnp.asarray(np.repeat(prompt, n, axis=0)),
                               init_cache(cfg, b * n))
        for i in range(max_new_tokens):
            rng, sub = jax.random.split(rng)
            s = mpd_step(logits4[0], sample_next(logits4[0], sub, sampling, n_valid),
                         np.full(b, i), mpd, lambda: logits4[1:], spent)
            spent += s.triggered
            steps.append(s)
            if i + 1 < max_new_tokens:
                logits4, cache = step4(params, jnp.asarray(np.repeat(s.token, n))[:, None],
                                       cache)
        return np.stack([s.token for s in steps], axis=1), steps
    prefill, step = _compiled(cfg, moe, activation_bits)
    views = views_step(cfg, moe, PERSPECTIVES[1:], activation_bits)
    cache = init_cache(cfg, b)
    if prompt.shape[1] > 1:
        _, cache = prefill(params, jnp.asarray(prompt[:, :-1]), cache)
    fed = jnp.asarray(prompt[:, -1])
    context = [list(row) for row in prompt]          # each row's text so far (recall)
    for i in range(max_new_tokens):
        logits, new_cache = step(params, fed, cache)
        rng, sub = jax.random.split(rng)
        s = mpd_step(logits, sample_next(logits, sub, sampling, n_valid), np.full(b, i), mpd,
                     lambda: views(params, fed, cache)[0], spent)
        if recall is not None:
            s = _recalled(cfg, moe, activation_bits, recall, s, context, params, fed, cache,
                          sub, sampling, n_valid)
        for row, tok in zip(context, s.token):
            row.append(int(tok))
        spent += s.triggered
        steps.append(s)
        fed, cache = jnp.asarray(s.token), new_cache
    return np.stack([s.token for s in steps], axis=1), steps


def _recalled(cfg, moe, activation_bits, recall, s: MPDStep, context, params, fed, cache,
              key, sampling, n_valid) -> MPDStep:
    """`s` with the uncertain rows whose context recalls a value decided again with the
    value injected (generate_mpd's `recall`)."""
    rows, vectors = [], np.zeros((len(context), cfg.d_model), np.float32)
    for r in s.uncertain_rows():
        got = recall(context[r])
        if got is not None:
            rows.append(r)
            vectors[r] = got.vector
    if not rows:
        return s._replace(recalled=np.zeros(len(context), bool))
    logits = _injected_step(cfg, moe, activation_bits, recall.inject_layer)(
        params, fed, cache, jnp.asarray(vectors))
    tokens = np.asarray(sample_next(logits, key, sampling, n_valid))
    for _ in rows:
        recall.injected()
    return s.with_recalled(rows, tokens[rows])
