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
                       with a memory, SPEC §3.7: the value recalled for the context
                       is injected and the token drawn from that step's logits)

Those are SPEC's confidences (MPDConfig.confidence="agreement"); they measure how
much the views agree, not how often the token is right (ECE 0.67 on the Quickstart
model, issue 20). The default confidence ("ensemble") is `mean_prob`, the views'
mean probability of the emitted token (ECE 0.065 there).

MPD runs only when `should_trigger` says so (every k-th position, P0's top
probability < p_min, or P0's entropy > h_max) and the budget allows it
(`within_budget`: at most `max_rate` of the tokens), so the average cost stays
well below 4×. The rule and the metrics are jnp, batched over B; `mpd_step` applies them
to one decode step of any engine (in-memory `generate`, the streaming
`Conversation`), which supplies P1..P3's logits only when a row triggers.

How the views keep state (`MPDConfig.state`): "forked" (the default) runs P1..P3
for the current token from P0's decode state — `views_step`, the four
perspectives as one batch through `RowRoutes`; "persistent" keeps one recurrent
state per perspective, every token paying for all four (SPEC's wording). The
measured comparison is in docs/benchmarks.md (issue 20).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.config import ModelConfig, MoEConfig
from perspective_jax.config.schema import MPDConfig
from perspective_jax.model.extensions import Extensions, RoutePolicy, RowRoutes
from perspective_jax.model.transformer import PerspectiveLM

PERSPECTIVES = (RoutePolicy("nearest"), RoutePolicy("kth", k=1), RoutePolicy("antipode"),
                RoutePolicy("random", seed=0))
EMIT_P0, EMIT_VOTE, UNCERTAIN = 0, 1, 2
# P1..P3 as one batch (row b routed by view b mod 3): what a triggered step runs
OTHER_VIEWS = Extensions(route=RowRoutes(PERSPECTIVES[1:]))


class MPDDecision(NamedTuple):
    """Per sequence [B]: `kind` (EMIT_P0 / EMIT_VOTE / UNCERTAIN), `token` (the voted
    token for EMIT_VOTE, else P0's argmax), `confidence` in [0, 1], `agreement`
    (mean pairwise JSD, nats), `votes` (of the most-voted argmax) and `mean_prob`
    (the views' mean probability of the emitted token)."""

    kind: jax.Array
    token: jax.Array
    confidence: jax.Array
    agreement: jax.Array
    votes: jax.Array
    mean_prob: jax.Array


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
    mean_prob = jnp.mean(jnp.take_along_axis(probs, token[None, :, None], axis=-1)[..., 0], 0)
    if cfg.confidence == "ensemble":
        confidence = mean_prob
    return MPDDecision(kind.astype(jnp.int32), token.astype(jnp.int32),
                       jnp.clip(confidence, 0.0, 1.0), agree, votes.astype(jnp.int32),
                       mean_prob)


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


def tile_cache(cache: dict, n: int) -> dict:
    """A decode cache of B sequences → B·n rows, row b·n + k a copy of sequence b (so
    `RowRoutes` routes it by policy k)."""
    return {"periods": jax.tree.map(lambda a: jnp.repeat(a, n, axis=1), cache["periods"]),
            "next_pos": jnp.repeat(cache["next_pos"], n, axis=0)}


def cache_rows(cache: dict, k: int, n: int) -> dict:
    """Rows k, k + n, k + 2n, … of a tiled cache: perspective k's B sequences."""
    return {"periods": jax.tree.map(lambda a: a[:, k::n], cache["periods"]),
            "next_pos": cache["next_pos"][k::n]}


def by_view(rows: jax.Array, n: int) -> jax.Array:
    """[B·n, ...] rows of a tiled batch → [n, B, ...] (view first)."""
    return jnp.swapaxes(rows.reshape(-1, n, *rows.shape[1:]), 0, 1)


@functools.lru_cache(maxsize=16)
def tiled_step(cfg: ModelConfig, moe: MoEConfig, policies: tuple = PERSPECTIVES,
               activation_bits: int = 0):
    """Jitted (params, tokens [B·n, T], tiled cache [B·n rows]) → (last logits [n, B, V],
    new tiled cache): row b·n + k is sequence b routed by policies[k] (`RowRoutes`),
    so the n perspectives run as one batch. A persistent-state MPD decode step (and
    its prefill) is this with each perspective's own cache rows."""
    model = PerspectiveLM(cfg, moe, activation_bits=activation_bits)
    n, ext = len(policies), Extensions(route=RowRoutes(policies))

    @jax.jit
    def step(params, tokens, cache):
        logits, new = model.apply({"params": params}, tokens, cache=cache, ext=ext)
        return by_view(logits[:, -1], n), new
    return step


@functools.lru_cache(maxsize=16)
def views_step(cfg: ModelConfig, moe: MoEConfig, policies: tuple = PERSPECTIVES,
               activation_bits: int = 0):
    """Jitted (params, token [B], cache of B rows) → (logits [n, B, V], tiled new
    cache [B·n rows]): one decode step of every sequence under each of the n
    `policies`, forked from the same cache, as one batch."""
    step, n = tiled_step(cfg, moe, policies, activation_bits), len(policies)
    return jax.jit(lambda params, token, cache: step(
        params, jnp.repeat(token, n)[:, None], tile_cache(cache, n)))


def forked_views(cfg: ModelConfig, moe: MoEConfig, params, token: jax.Array, cache: dict,
                 activation_bits: int = 0):
    """The four perspectives' next-token logits [4, B, V] for `token` [B], each forked
    from the same decode `cache` (P0's state: the views differ only in this token's
    routing), and P0's new cache — what decoding continues from."""
    logits, tiled = views_step(cfg, moe, PERSPECTIVES, activation_bits)(params, token, cache)
    return logits, cache_rows(tiled, 0, len(PERSPECTIVES))


class MPDStep(NamedTuple):
    """What MPD made of one decode step, per sequence [B] (numpy): the emitted
    `token`, its `confidence`, whether MPD `triggered`, the decision `kind` (EMIT_P0
    where it did not trigger), the views' `agreement` (NaN where it did not), and
    whether the token came from a step with a memory value injected (`recalled`,
    None: no memory was consulted; `uncertain_rows`, `with_recalled`)."""

    token: np.ndarray
    confidence: np.ndarray
    triggered: np.ndarray
    kind: np.ndarray
    agreement: np.ndarray
    recalled: Optional[np.ndarray] = None

    def uncertain_rows(self) -> np.ndarray:
        """Rows whose views ran and found no majority: where a memory is consulted."""
        return np.flatnonzero(self.triggered & (self.kind == UNCERTAIN))

    def with_recalled(self, rows, tokens) -> "MPDStep":
        """This step with `tokens` emitted at `rows` (decided with a memory value)."""
        token, recalled = self.token.copy(), np.zeros(self.token.shape, bool)
        token[rows], recalled[rows] = tokens, True
        return self._replace(token=token.astype(np.int32), recalled=recalled)


def within_budget(spent, position, max_rate: float):
    """Whether a trigger at `position` (tokens decided so far) is honoured after
    `spent` honoured triggers: spent < max_rate · (position + 1)."""
    return spent < max_rate * (position + 1)


@functools.partial(jax.jit, static_argnums=(3,))
def _triggers(p0_logits, position, spent, cfg: MPDConfig):
    p0 = jax.nn.softmax(p0_logits.astype(jnp.float32), axis=-1)
    fires = should_trigger(position, p0, cfg) & within_budget(spent, position, cfg.max_rate)
    return fires, jnp.max(p0, axis=-1), p0


@functools.partial(jax.jit, static_argnums=(2,))
def _decide_views(p0, view_logits, cfg: MPDConfig) -> MPDDecision:
    probs = jnp.concatenate([p0[None], jax.nn.softmax(view_logits.astype(jnp.float32), -1)])
    return decide(probs, cfg)


def mpd_step(p0_logits, sampled, position, cfg: MPDConfig, other_views: Callable,
             spent=None) -> MPDStep:
    """The MPD decode rule, shared by in-memory generation and the streaming engine.

    p0_logits [B, V] (P0's next-token logits), sampled [B] (the token the sampling
    rule drew from them), position [B] (tokens decided so far: every-k triggering
    and the budget), spent [B] (triggers honoured so far; None = 0); `other_views()` →
    logits [3, B, V] of P1..P3, called only when some row triggers. A triggered row
    emits the voted token on EMIT_VOTE and P0's sample otherwise (EMIT_P0, or
    UNCERTAIN: flagged); every other row emits P0's sample with confidence P0's top
    probability (≥ p_min, or it would have triggered). Two jitted calls at most."""
    sampled = np.asarray(sampled, np.int32)
    position = np.asarray(position, np.int32)
    spent = np.zeros_like(position) if spent is None else np.asarray(spent, np.int32)
    fires, top, p0 = _triggers(jnp.asarray(p0_logits), jnp.asarray(position),
                               jnp.asarray(spent), cfg)
    triggered, top = np.asarray(fires), np.asarray(top)
    if not triggered.any():
        nan = np.full(sampled.shape, np.nan, np.float32)
        return MPDStep(sampled, top, triggered, np.zeros_like(sampled), nan)
    d = jax.tree.map(np.asarray, _decide_views(p0, jnp.asarray(other_views()), cfg))
    token = np.where(triggered & (d.kind == EMIT_VOTE), d.token, sampled).astype(np.int32)
    return MPDStep(token, np.where(triggered, d.confidence, top).astype(np.float32),
                   triggered, np.where(triggered, d.kind, EMIT_P0).astype(np.int32),
                   np.where(triggered, d.agreement, np.nan).astype(np.float32))
