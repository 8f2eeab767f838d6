"""Multi-Perspective Decoding: the decision rule over four routing views (SPEC §3.6).

The four perspectives are the same model routed four ways (`PERSPECTIVES`, each an
`extensions.RoutePolicy`): P0 nearest, P1 second-nearest, P2 the antipode of the
query on the torus, P3 a seeded random expert per layer. Given their next-token
distributions p_0..p_3 [4, B, V]:

    JSD(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m),  m = ½ (p + q)        (nats, ≤ ln 2)
    agree     = mean of JSD over the 6 pairs
    agree < τ        → emit from P0, confidence 1 − agree / τ            (EMIT_P0)
    else, a token is the argmax of ≥ min_votes perspectives
                     → emit it, confidence = votes/4 · mean p_i(token) over
                       the perspectives that voted for it                  (EMIT_VOTE)
    else             → emit from P0, flagged uncertain, confidence 0       (UNCERTAIN;
                       the hook for the memory fallback of SPEC §3.7)

MPD runs only when `should_trigger` says so (every k-th position, P0's top
probability < p_min, or P0's entropy > h_max), so the average cost stays well
below 4×. Everything here is jnp and batched over B, usable inside a jitted step.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from perspective_jax.config import ModelConfig, MoEConfig
from perspective_jax.config.schema import MPDConfig
from perspective_jax.model.extensions import Extensions, RoutePolicy
from perspective_jax.model.transformer import PerspectiveLM

PERSPECTIVES = (RoutePolicy("nearest"), RoutePolicy("kth", k=1), RoutePolicy("antipode"),
                RoutePolicy("random", seed=0))
EMIT_P0, EMIT_VOTE, UNCERTAIN = 0, 1, 2


class MPDDecision(NamedTuple):
    """Per sequence [B]: `kind` (EMIT_P0 / EMIT_VOTE / UNCERTAIN), `token` (the voted
    token for EMIT_VOTE, else P0's argmax), `confidence` in [0, 1], `agreement`
    (mean pairwise JSD, nats) and `votes` (of the most-voted argmax)."""

    kind: jax.Array
    token: jax.Array
    confidence: jax.Array
    agreement: jax.Array
    votes: jax.Array


def _xlogy_ratio(p, q):
    """Σ p log(p / q) over the last axis, with 0 log 0 = 0 (q > 0 wherever p > 0)."""
    safe = jnp.where(p > 0, p, 1.0)
    return jnp.sum(jnp.where(p > 0, p * (jnp.log(safe) - jnp.log(jnp.where(p > 0, q, 1.0))),
                             0.0), axis=-1)


def js_divergence(p: jax.Array, q: jax.Array) -> jax.Array:
    """Jensen–Shannon divergence (nats) of distributions over the last axis."""
    m = 0.5 * (p + q)
    return 0.5 * _xlogy_ratio(p, m) + 0.5 * _xlogy_ratio(q, m)


def agreement(probs: jax.Array) -> jax.Array:
    """Mean pairwise JSD of probs [P, ..., V] → [...] (0: identical views)."""
    n = probs.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    return sum(js_divergence(probs[i], probs[j]) for i, j in pairs) / len(pairs)


def decide(probs: jax.Array, cfg: MPDConfig = MPDConfig()) -> MPDDecision:
    """The MPD rule (module docstring) on probs [P, B, V] (P0 first)."""
    probs = probs.astype(jnp.float32)
    agree = agreement(probs)                                        # [B]
    top = jnp.argmax(probs, axis=-1)                                # [P, B]
    same = top[:, None, :] == top[None, :, :]                       # [P, P, B]
    counts = jnp.sum(same, axis=1)                                  # votes of each one's argmax
    best = jnp.argmax(counts, axis=0)                               # first most-voted [B]
    votes = jnp.max(counts, axis=0)
    voted = jnp.take_along_axis(top, best[None], axis=0)[0]         # [B]
    p_voted = jnp.take_along_axis(probs, voted[None, :, None], axis=-1)[..., 0]  # [P, B]
    voters = top == voted[None]
    vote_conf = votes / probs.shape[0] * (jnp.sum(jnp.where(voters, p_voted, 0.0), 0)
                                          / jnp.maximum(votes, 1))
    calm = agree < cfg.tau
    majority = votes >= cfg.min_votes
    kind = jnp.where(calm, EMIT_P0, jnp.where(majority, EMIT_VOTE, UNCERTAIN))
    token = jnp.where(kind == EMIT_VOTE, voted, top[0])
    confidence = jnp.where(calm, 1.0 - agree / cfg.tau,
                           jnp.where(majority, vote_conf, 0.0))
    return MPDDecision(kind.astype(jnp.int32), token.astype(jnp.int32),
                       jnp.clip(confidence, 0.0, 1.0), agree, votes.astype(jnp.int32))


def entropy(probs: jax.Array) -> jax.Array:
    """Shannon entropy (nats) over the last axis, 0 log 0 = 0."""
    return -_xlogy_ratio(probs, jnp.ones_like(probs))


def should_trigger(position: jax.Array, p0: jax.Array, cfg: MPDConfig = MPDConfig()):
    """Whether MPD runs for the token after `position` [B], from P0's distribution
    p0 [B, V]: every k-th position, top probability < p_min, or entropy > h_max."""
    by_position = (position % cfg.every_k == 0) if cfg.every_k else jnp.zeros_like(
        position, dtype=bool)
    unsure = jnp.max(p0, axis=-1) < cfg.p_min
    spread = entropy(p0) > cfg.h_max
    return by_position | unsure | spread


@functools.lru_cache(maxsize=8)
def _views_step(cfg: ModelConfig, moe: MoEConfig, activation_bits: int = 0):
    model = PerspectiveLM(cfg, moe, activation_bits=activation_bits)

    @jax.jit
    def step(params, token, cache):
        outs = [model.apply({"params": params}, token[:, None], cache=cache,
                            ext=Extensions(route=policy)) for policy in PERSPECTIVES]
        return jnp.stack([logits[:, -1] for logits, _ in outs]), outs[0][1]
    return step


def forked_views(cfg: ModelConfig, moe: MoEConfig, params, token: jax.Array, cache: dict,
                 activation_bits: int = 0):
    """The four perspectives' next-token logits [4, B, V] for `token` [B], each forked
    from the same decode `cache` (P0's state: the views differ only in this token's
    routing), and P0's new cache — what decoding continues from."""
    return _views_step(cfg, moe, activation_bits)(params, token, cache)
