"""The engine's counters and the --stats report built from them.

`Stats` is filled by the engine (token counts, timings) and by `ExpertTiers`
(transfers, bytes, guesses, stalls); `report(engine)` is the --stats table's
content; `peak_rss_bytes()` reads the process's peak resident memory on Linux.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Optional

KINDS = ("same", "delta", "host_delta", "full")   # how a wanted expert reached its slot
TIERS = ("disk", "host_to_device")                 # where `Stats.count_bytes` bytes moved


@dataclasses.dataclass
class Stats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    compile_s: float = 0.0      # tracing + compiling during feeds (not in prefill/decode)
    batch_steps: int = 0        # batched decode steps (`StreamingEngine.step`)
    transfers: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    bytes_moved: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    #                             host→device bytes per kind (+ "wasted": wrong guesses)
    predictions: int = 0
    predicted_right: int = 0
    # prefetch guesses scored by kind (`infer.predictor`): layer j+1's expert guessed
    # during layer j, and the next token's layer-0 expert guessed after the final state
    layer_guesses: int = 0
    layer_guesses_right: int = 0
    token_guesses: int = 0
    token_guesses_right: int = 0
    stalls: int = 0
    stall_s: float = 0.0
    cancelled: int = 0          # wrong prefetches stopped part-way through their read
    failed_guesses: int = 0     # wrong prefetches whose read failed (not needed: no error)
    damaged_deltas: list = dataclasses.field(default_factory=list)   # messages; each
    #                             delta failed its checksum and its target loaded in full
    # Multi-Perspective Decoding (infer.session.Conversation with mpd)
    mpd_tokens: int = 0         # tokens decided with MPD on
    mpd_triggered: int = 0      # of which MPD ran the other views
    mpd_kinds: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    mpd_agreements: list = dataclasses.field(default_factory=list)   # JSD (nats) per trigger
    mpd_view_rows: int = 0      # rows the views added to batched steps (not emitted tokens)
    mpd_view_steps: int = 0
    mpd_extra_bytes: int = 0    # expert bytes moved for the views (and memory injections)
    # the memory consulted where MPD's views found no majority (SPEC §3.7)
    memory_on: bool = False     # a memory is attached (its counts are reported)
    memory_lookups: int = 0
    memory_hits: int = 0        # values found at or above the similarity threshold
    memory_injections: int = 0  # steps decided again with a value injected
    # the final-state transform (Extensions.final_transform, e.g. the safety projection)
    final_checked: int = 0      # states a transform with `moves` was checked on
    final_rows: int = 0         # states in the head calls where it moved some state
    final_s: float = 0.0        # those calls' time (the transform + head; no compiling)
    # the safety projection of guarded sequences (infer.safety_guard.SafetyGuard.observe)
    safety_tokens: int = 0      # positions of guarded sequences whose logits it projected
    safety_active: int = 0      # of which the projection moved (outside the polytope)
    safety_iterations: int = 0  # active-set iterations, summed over the moved ones
    safety_max_iterations: int = 0
    safety_max_violation: float = 0.0   # largest residual violation before a fallback
    safety_pulled: int = 0      # fell back toward the interior point (not converged)
    # bytes by tier (ExpertTiers through `count_bytes`): disk bytes read (regions and
    # deltas) per kind (+ "wasted"), and both tiers' totals split by the forward they
    # were spent in — one that decoded or one that prefilled (`tier_bytes`)
    disk_bytes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    decode_bytes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    prefill_bytes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    _open_bytes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    _open_marks: tuple = (0, 0)   # (prefill_tokens, decode_tokens) when _open_bytes began

    def count_bytes(self, kind: str, to_device: int, disk: int) -> None:
        """Bytes one bring moved host→device and read from disk (kind: a KINDS entry or
        "wasted"). Until the engine accounts the forward they belong to (its token
        counts move) they are held open, then added to decode or prefill bytes."""
        self._settle()
        self.bytes_moved[kind] += to_device
        self.disk_bytes[kind] += disk
        self._open_bytes.update({"host_to_device": to_device, "disk": disk})

    def _settle(self) -> None:
        marks = (self.prefill_tokens, self.decode_tokens)
        if marks != self._open_marks:
            phase = self.decode_bytes if marks[1] != self._open_marks[1] else self.prefill_bytes
            phase.update(self._open_bytes)
            self._open_bytes, self._open_marks = collections.Counter(), marks

    def tier_bytes(self) -> dict:
        """{"decode" | "prefill": {tier: bytes}} of the forwards accounted so far."""
        self._settle()
        return {phase: {t: counts[t] for t in TIERS}
                for phase, counts in (("decode", self.decode_bytes),
                                      ("prefill", self.prefill_bytes))}

    def brings(self) -> int:
        """Expert regions asked of the tiers so far (each "same", "delta" or "full")."""
        return sum(self.transfers[k] for k in KINDS)


# agreement histogram edges (mean pairwise JSD, nats; ln 2 is the largest possible)
AGREEMENT_EDGES = (0.0, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.4, 0.6932)
MPD_KIND_NAMES = ("emit_p0", "emit_vote", "uncertain")   # model.mpd EMIT_P0, EMIT_VOTE, …


def moved_bytes(stats: Stats) -> int:
    """Expert bytes moved so far, wasted prefetches included."""
    return sum(stats.bytes_moved.values())


def mpd_report(s: Stats) -> dict:
    """MPD's part of the --stats report: trigger rate, decisions, the agreement
    histogram (counts per [edge_i, edge_i+1) bin, nats) and the views' extra cost."""
    counts = [0] * (len(AGREEMENT_EDGES) - 1)
    for a in s.mpd_agreements:
        i = sum(a >= e for e in AGREEMENT_EDGES[1:-1])
        counts[i] += 1
    labels = [f"[{lo:g},{hi:.3g})" for lo, hi in zip(AGREEMENT_EDGES, AGREEMENT_EDGES[1:])]
    return {"tokens": s.mpd_tokens, "triggered": s.mpd_triggered,
            "trigger_rate": s.mpd_triggered / s.mpd_tokens if s.mpd_tokens else 0.0,
            "decisions": {name: s.mpd_kinds[k] for k, name in enumerate(MPD_KIND_NAMES)},
            "agreement_histogram": dict(zip(labels, counts)),
            "extra_expert_bytes": s.mpd_extra_bytes, "view_steps": s.mpd_view_steps}


def safety_report(s: Stats) -> dict:
    """The safety projection's part of the --stats report: how many states it saw and
    moved, its iterations, residual violation and fallbacks, and the time of a head
    call that projected (per state in it: MPD's views and a server's padding included;
    a head whose states all lie inside costs one more matrix–vector product, timed
    only as part of the decode rate)."""
    return {"tokens_guarded": s.safety_tokens, "projections_active": s.safety_active,
            "active_rate": s.safety_active / s.safety_tokens if s.safety_tokens else 0.0,
            "mean_iterations": (s.safety_iterations / s.safety_active
                                if s.safety_active else 0.0),
            "max_iterations": s.safety_max_iterations,
            "max_residual_violation": s.safety_max_violation,
            "fallbacks": s.safety_pulled,
            "projecting_head_us_per_state": (1e6 * s.final_s / s.final_rows
                                             if s.final_rows else 0.0)}


def tier_report(s: Stats, decoded: int) -> dict:
    """Bytes by tier for --stats: disk bytes per kind (host→device ones are
    `bytes_moved`), and both tiers' bytes per decoded token (the bytes of forwards
    that decoded — wrong guesses and MPD's views included — over the tokens emitted)."""
    decode = s.tier_bytes()["decode"]
    return {"disk_bytes": {k: s.disk_bytes[k] for k in (*KINDS, "wasted")},
            "disk_bytes_per_token": decode["disk"] / decoded if decoded else 0.0,
            "host_to_device_bytes_per_token": (decode["host_to_device"] / decoded
                                               if decoded else 0.0)}


def guess_report(engine) -> dict:
    """The prefetch predictor's part of the --stats report: which predictor, whether the
    model's learned heads are used, and the share of right guesses for layer j+1 and
    for the next token's layer 0 (0.0 when none was scored)."""
    s = engine.stats
    return {"predictor": engine.predictor_mode,
            "learned_predictor": engine.learned_predictor,
            "prefetch_accuracy_next_layer": (s.layer_guesses_right / s.layer_guesses
                                             if s.layer_guesses else 0.0),
            "prefetch_guesses_next_layer": s.layer_guesses,
            "prefetch_accuracy_next_token_layer0": (s.token_guesses_right / s.token_guesses
                                                    if s.token_guesses else 0.0),
            "prefetch_guesses_next_token_layer0": s.token_guesses}


def report(engine) -> dict:
    """The --stats statistics of `engine` (a StreamingEngine)."""
    s = engine.stats
    decoded = s.decode_tokens - s.mpd_view_rows       # MPD's view rows are not tokens
    out = {
        "prefill_tokens": s.prefill_tokens,
        "prefill_tok_per_s": s.prefill_tokens / s.prefill_s if s.prefill_s else 0.0,
        "decode_tokens": decoded,
        "decode_tok_per_s": decoded / s.decode_s if s.decode_s else 0.0,
        "compile_s": s.compile_s,
        "device_bytes_held": engine.device_bytes_needed,
    }
    if s.batch_steps - s.mpd_view_steps:
        out["batch_steps"] = s.batch_steps - s.mpd_view_steps
    if s.mpd_tokens:
        out["mpd"] = mpd_report(s)
    if s.memory_on or s.memory_lookups:
        out["memory"] = {"lookups": s.memory_lookups, "hits": s.memory_hits,
                         "injections": s.memory_injections}
    if s.safety_tokens:
        out["safety"] = safety_report(s)
    if engine.routed:
        host, tiers = engine.host, engine.tiers
        lookups = host.hits + host.misses
        out.update({
            "transfers": {k: s.transfers[k] for k in KINDS},
            "bytes_moved": {k: s.bytes_moved[k] for k in (*KINDS, "wasted")},
            "disk_bytes_read": engine.store.bytes_read,
            **tier_report(s, decoded),
            "host_cache_hit_rate": host.hits / lookups if lookups else 0.0,
            "host_cache_evictions": host.evictions,
            "host_peak_bytes": host.peak_bytes,
            "host_budget_bytes": host.budget_bytes,
            "host_read_buffers_peak": tiers.buffers_peak,
            "host_read_buffers_budgeted": tiers.buffers_budgeted,
            "prefetch_accuracy": s.predicted_right / s.predictions if s.predictions else 0.0,
            "stalls": s.stalls, "stall_s": s.stall_s, "prefetch_cancelled": s.cancelled,
            "prefetch_failed": s.failed_guesses,
            "damaged_deltas": len(s.damaged_deltas),
            "device_slots": engine.n_slots,
            "device_expert_regions_peak": engine.slots.regions_peak,
            "warm_start_regions": engine.warmed,
            "hub_regions_pinned": engine.hubs_pinned,
        })
    if engine.routed:
        out.update(guess_report(engine))
    rss = peak_rss_bytes()
    if rss is not None:
        out["process_peak_rss_bytes"] = rss
    device = engine.device
    mem = device.memory_stats() if hasattr(device, "memory_stats") else None
    if mem and "peak_bytes_in_use" in mem:
        out["device_peak_bytes_runtime"] = mem["peak_bytes_in_use"]
    return out


def peak_rss_bytes() -> Optional[int]:
    """Peak resident memory of this process (Linux VmHWM), or None elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
