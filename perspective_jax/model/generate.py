"""In-memory generation for evaluation: prefill once, then cached decode steps.

    tokens = generate(cfg, params, prompt_ids, max_new_tokens=64,
                      sampling=Sampling(temperature=0.8, top_k=40), seed=0)

Sampling: greedy (temperature 0), temperature, top-k and top-p (nucleus).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.config import ModelConfig, MoEConfig
from perspective_jax.errors import UserError
from perspective_jax.model.transformer import PerspectiveLM, init_cache


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0   # 0 → greedy
    top_k: int = 0             # 0 → off
    top_p: float = 1.0         # 1 → off

    def __post_init__(self):
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must lie in (0, 1], got {self.top_p}")


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """Apply temperature, top-k and top-p to logits [B, V]; removed entries → −inf."""
    logits = logits.astype(jnp.float32) / max(sampling.temperature, 1e-6)
    vocab = logits.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always the first token)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < sampling.top_p
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def sample_next(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """logits [B, V] → token ids [B]."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filter_logits(logits, sampling)).astype(jnp.int32)


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
             activation_bits: int = 0) -> np.ndarray:
    """prompt [B, T0] int → generated continuation [B, ≤ max_new_tokens].
    `activation_bits=8`: int8 expert activations, as the ternary stage trains."""
    prompt = np.asarray(prompt, dtype=np.int32)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise UserError("prompt must be a non-empty [batch, tokens] array of ids")
    if max_new_tokens <= 0:
        raise UserError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if prompt.min() < 0 or prompt.max() >= cfg.vocab_size:
        raise UserError(f"prompt ids must lie in [0, {cfg.vocab_size})")
    prefill, step = _compiled(cfg, moe, activation_bits)
    rng = jax.random.key(seed)
    logits, cache = prefill(params, jnp.asarray(prompt), init_cache(cfg, prompt.shape[0]))
    out = []
    done = np.zeros(prompt.shape[0], dtype=bool)
    for _ in range(max_new_tokens):
        rng, sub = jax.random.split(rng)
        token = sample_next(logits, sub, sampling)
        out.append(np.asarray(token))
        if eos_id is not None:
            done |= out[-1] == eos_id
            if done.all():
                break
        logits, cache = step(params, token, cache)
    return np.stack(out, axis=1)
