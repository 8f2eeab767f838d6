"""Multi-Perspective Decoding of one sequence on the streaming engine.

    info = mpd_on_engine(engine, logits, sampled, step, mpd_cfg, spent, before, fed)

P0's logits [V] come from the sequence's own step; when MPD triggers
(`model.mpd.mpd_step`: every k-th token, low top probability or high entropy,
within the budget `max_rate` given the triggers `spent` so far), P1..P3 run as one
batched engine step (`RowRoutes` through `OTHER_VIEWS`, experts grouped per layer
across the views) on the token `fed` from the state `before` it. The trigger, the
decision, the agreement and the views' extra expert bytes and rows are counted in
the engine's stats (`mpd_*`). With a `guard` (infer.safety_guard.SafetyGuard) the
views are projected as P0 is, with the flagged rows active after `tail` (the text
through `fed`). Where the views find no majority and a memory is given, the memory
is consulted (`recall_on_engine`, SPEC §3.7). Used by `infer.session.Conversation`
and the server.
"""

from __future__ import annotations

import numpy as np

from perspective_jax.config.schema import MPDConfig
from perspective_jax.infer.state import EngineState
from perspective_jax.infer.stats import moved_bytes
from perspective_jax.model.extensions import Extensions
from perspective_jax.model.mpd import OTHER_VIEWS, PERSPECTIVES, MPDStep, mpd_step


def mpd_on_engine(engine, logits: np.ndarray, sampled: int, step: int, cfg: MPDConfig,
                  spent: int, before: EngineState, fed: int, guard=None,
                  tail: bytes = b"", recall=None, context=(), resample=None) -> MPDStep:
    """MPD's decision on one decode step (module docstring); an MPDStep of batch 1.
    With `recall` (memory.recall.MemoryRecall), `context` (the ids so far, `fed`
    last) and `resample(logits [V]) → token` (the sequence's sampling rule at this
    step): see `recall_on_engine`."""
    stats = engine.stats
    n_views = len(PERSPECTIVES) - 1

    def other_views():
        moved = moved_bytes(stats)
        views = (OTHER_VIEWS if guard is None
                 else guard.extensions([tail] * n_views, base=OTHER_VIEWS))
        rows, _ = engine.step([before] * n_views, [fed] * n_views, views,
                              keep_states=False)
        stats.mpd_view_rows += n_views
        stats.mpd_view_steps += 1
        stats.mpd_extra_bytes += moved_bytes(stats) - moved
        return rows[:, None, :]
    info = mpd_step(np.asarray(logits)[None], np.asarray([sampled]), np.asarray([step]),
                    cfg, other_views, np.asarray([spent]))
    stats.mpd_tokens += 1
    if info.triggered[0]:
        stats.mpd_triggered += 1
        stats.mpd_kinds[int(info.kind[0])] += 1
        stats.mpd_agreements.append(float(info.agreement[0]))
        if recall is not None and len(info.uncertain_rows()):
            info = recall_on_engine(engine, info, recall, context, resample, before, fed,
                                    guard, tail)
    return info


def recall_on_engine(engine, info: MPDStep, recall, context, resample, before: EngineState,
                     fed: int, guard=None, tail: bytes = b"") -> MPDStep:
    """The views found no majority: query the memory with the context; on a hit run
    the step again from `before` with the value's vector injected after
    `recall.inject_layer` (`Extensions.inject`; projected as P0 is with a guard) and
    emit `resample` of those logits. The sequence's state stays P0's own."""
    stats = engine.stats
    stats.memory_lookups += 1
    got = recall(context)
    if got is None:
        return info
    stats.memory_hits += 1
    ext = Extensions(inject_layer=recall.inject_layer, inject=np.asarray(got.vector)[None])
    if guard is not None:
        ext = guard.extensions([tail], base=ext)
    moved = moved_bytes(stats)
    rows, _ = engine.step([before], [fed], ext, keep_states=False)
    stats.mpd_view_rows += 1                   # an extra row of MPD's, not a token
    stats.mpd_view_steps += 1
    stats.mpd_extra_bytes += moved_bytes(stats) - moved
    stats.memory_injections += 1
    recall.injected()
    return info.with_recalled([0], [int(resample(rows[0]))])
