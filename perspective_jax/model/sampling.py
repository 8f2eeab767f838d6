"""The sampling rule, defined once: temperature, top-k, top-p, greedy at T = 0.

    token = sample_next(logits [B, V], key, Sampling(temperature=0.8, top_k=40))   # [B]

Used by in-memory generation (`model.generate`), training samples and the
streaming engine's conversations (`infer.session`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from perspective_jax.errors import UserError


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
