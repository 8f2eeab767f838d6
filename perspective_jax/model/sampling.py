"""The sampling rule, defined once: temperature, top-k, top-p, greedy at T = 0, and
only ids the tokenizer has.

    token = sample_next(logits [B, V], key, Sampling(temperature=0.8, top_k=40),
                        n_valid=tokenizer.vocab_size)                          # [B]
    logp = log_probs(logits [..., V], n_valid=tokenizer.vocab_size)   # float32 [..., V]

Used by in-memory generation (`model.generate`), training samples and the
streaming engine's conversations (`infer.session`); `log_probs` is the one rule by
which text is scored (the lm-evaluation-harness model, the server's logprobs).

A trained tokenizer may have fewer pieces than `model.vocab_size` (sentencepiece stops
early on a narrow corpus: numbers, one script). The model keeps its configured
vocabulary and ids >= the tokenizer's piece count are never chosen (`n_valid`),
rather than the vocabulary following the tokenizer: runs and model directories that
already exist keep working unchanged, the resolved config stays what the user asked
for (resume and --init-from compare it), and the unused rows cost only
(vocab_size - pieces) x d_model parameters.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.config.choices import TEMPERATURE_RANGE
from perspective_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0   # 0 → greedy
    top_k: int = 0             # 0 → off
    top_p: float = 1.0         # 1 → off

    def __post_init__(self):
        lo, hi = TEMPERATURE_RANGE
        if not lo <= self.temperature <= hi:
            raise UserError(f"temperature must lie in [{lo:g}, {hi:g}] (0 = greedy), got "
                            f"{self.temperature}")
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


def mask_unknown(logits: jax.Array, n_valid: Optional[int]) -> jax.Array:
    """logits [..., V] with ids >= n_valid (the tokenizer's piece count) set to −inf;
    None → unchanged."""
    if n_valid is None or n_valid >= logits.shape[-1]:
        return logits
    if n_valid < 1:
        raise UserError(f"the tokenizer has {n_valid} pieces; it cannot decode anything")
    return jnp.where(jnp.arange(logits.shape[-1]) < n_valid, logits, -jnp.inf)


def log_probs(logits, n_valid: Optional[int] = None) -> jax.Array:
    """float32 log-probabilities [..., V] of logits [..., V] over the ids below n_valid
    (the tokenizer's piece count; the others −inf, as `mask_unknown`); None → all ids."""
    return jax.nn.log_softmax(mask_unknown(jnp.asarray(logits, jnp.float32), n_valid), axis=-1)


def sample_next(logits: jax.Array, rng: jax.Array, sampling: Sampling,
                n_valid: Optional[int] = None) -> jax.Array:
    """logits [B, V] → token ids [B], each < n_valid (the tokenizer's piece count)."""
    logits = mask_unknown(logits, n_valid)
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filter_logits(logits, sampling)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("sampling", "n_valid"))
def _sample_rows(logits, seeds, steps, sampling: Sampling, n_valid: Optional[int]):
    def one(row, seed, step):
        key = jax.random.fold_in(jax.random.key(seed), step)
        return sample_next(row[None], key, sampling, n_valid)[0]
    return jax.vmap(one)(logits, seeds, steps)


def sample_rows(logits, seeds, steps, sampling: Sampling,
                n_valid: Optional[int] = None) -> np.ndarray:
    """logits [B, V] → token ids [B] (numpy), row b drawn by `sample_next` with the key
    fold_in(key(seeds[b]), steps[b]): each sequence its own seed and position, so a
    sequence draws the same tokens alone or in any batch (the streaming engine's
    conversations and the server's batched sequences). One compiled program per
    (sampling, n_valid, B)."""
    return np.asarray(_sample_rows(jnp.asarray(logits), jnp.asarray(seeds, jnp.uint32),
                                   jnp.asarray(steps, jnp.int32), sampling, n_valid))

