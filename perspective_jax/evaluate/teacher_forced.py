"""Teacher-forced next-token predictions of a streamed model, with MPD's views.

    segs = segments(token_ids, seg_len=128, max_segments=32)      # [S, seg_len + 1]
    scored = score(engine, segs, MPDConfig())                     # a Scored, N = S·seg_len

For every position t of every segment (the model has read tokens 0..t of it and
predicts token t+1):

* `logits` [N, V]: P0 (nearest routing) — one prefill pass per segment;
* MPD with persistent per-perspective states: each perspective reads the whole
  segment with its own routing (one prefill pass per segment and perspective);
* MPD with views forked from P0's state: P0 decodes the segment token by token
  (all segments as one batched engine step) and, at every position, P1..P3 run
  on the token just read from P0's state before it (one batched step of 3·S
  rows, `RowRoutes`) — what decoding with `mpd.state=forked` computes.

Each MPD variant keeps `model.mpd.decide`'s outcome per position (`MPDDecision`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.config.schema import MPDConfig
from perspective_jax.errors import UserError
from perspective_jax.model.extensions import Extensions
from perspective_jax.model.mpd import OTHER_VIEWS, PERSPECTIVES, MPDDecision, decide

MPD_STATES_SCORED = ("forked", "persistent")


class Scored(NamedTuple):
    """Teacher-forced predictions of N positions: targets [N], P0's logits [N, V], the
    position within its segment [N], the segment [N], and MPD's decisions per state
    mode ({"forked": MPDDecision, "persistent": MPDDecision}, numpy arrays [N], their
    `confidence` SPEC's — MPDConfig.confidence="agreement" — and `mean_prob` the
    ensemble's)."""

    targets: np.ndarray
    logits: np.ndarray
    position: np.ndarray
    segment: np.ndarray
    mpd: dict

    def select(self, mask: np.ndarray) -> "Scored":
        """The positions where `mask` [N] holds."""
        return Scored(self.targets[mask], self.logits[mask], self.position[mask],
                      self.segment[mask], {k: MPDDecision(*(a[mask] for a in v))
                                           for k, v in self.mpd.items()})


def segments(ids: np.ndarray, seg_len: int, max_segments: int) -> np.ndarray:
    """Up to `max_segments` non-overlapping windows [S, seg_len + 1] of token ids,
    spread evenly over the text (each predicts its last seg_len tokens)."""
    ids = np.asarray(ids, np.int32).reshape(-1)
    if seg_len < 1 or max_segments < 1:
        raise UserError(f"segment length {seg_len} and count {max_segments} must be >= 1")
    n = (ids.size - 1) // seg_len
    if n < 1:
        raise UserError(f"the evaluation text has {ids.size} tokens; it needs at least "
                        f"{seg_len + 1} (one segment)")
    pick = np.unique(np.linspace(0, n - 1, min(n, max_segments)).round().astype(int))
    return np.stack([ids[k * seg_len: k * seg_len + seg_len + 1] for k in pick])


def _decisions(probs: jax.Array, cfg: MPDConfig) -> MPDDecision:
    return jax.tree.map(np.asarray, decide(probs, dataclasses.replace(cfg,
                                                                      confidence="agreement")))


def _softmax(logits) -> jax.Array:
    return jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)


def _persistent(engine, segs: np.ndarray, cfg: MPDConfig, p0: np.ndarray) -> MPDDecision:
    views = [p0] + [np.concatenate([engine.forward(seg[:-1], engine.new_state(),
                                                   Extensions(route=policy), all_logits=True)[0]
                                    for seg in segs])
                    for policy in PERSPECTIVES[1:]]
    return _decisions(_softmax(np.stack(views)), cfg)


def _forked(engine, segs: np.ndarray, cfg: MPDConfig) -> MPDDecision:
    n_seg, length = segs.shape[0], segs.shape[1] - 1
    n_views = len(PERSPECTIVES) - 1
    states = [engine.new_state() for _ in range(n_seg)]
    out = []
    for t in range(length):
        tokens = segs[:, t]
        p0, after = engine.step(states, tokens)
        views, _ = engine.step([s for s in states for _ in range(n_views)],
                               np.repeat(tokens, n_views), OTHER_VIEWS,
                               keep_states=False)                       # row b·3 + k
        views = np.swapaxes(views.reshape(n_seg, n_views, -1), 0, 1)     # [3, S, V]
        out.append(_decisions(_softmax(np.concatenate([p0[None], views])), cfg))
        states = after
    # [T][S] → segment-major [S·T], as the prefill logits are laid out
    return MPDDecision(*(np.stack(field, axis=1).reshape(-1) for field in zip(*out)))


def score(engine, segs: np.ndarray, cfg: MPDConfig = MPDConfig(),
          states: tuple = MPD_STATES_SCORED) -> Scored:
    """Teacher-forced predictions of every segment (module docstring) on a
    `StreamingEngine`; MPD decisions for each mode in `states`."""
    segs = np.asarray(segs, np.int32)
    logits = np.concatenate([engine.forward(seg[:-1], engine.new_state(), all_logits=True)[0]
                             for seg in segs])
    n_seg, length = segs.shape[0], segs.shape[1] - 1
    mpd = {}
    if "persistent" in states:
        mpd["persistent"] = _persistent(engine, segs, cfg, logits)
    if "forked" in states:
        mpd["forked"] = _forked(engine, segs, cfg)
    return Scored(segs[:, 1:].reshape(-1), logits, np.tile(np.arange(length), n_seg),
                  np.repeat(np.arange(n_seg), length), mpd)
