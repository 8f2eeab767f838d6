"""Layer-streamed inference over a model directory (SPEC §3.5).

    engine = StreamingEngine(model_dir, host_budget_mb=1024, device_budget_mb=None)
    state = engine.new_state()
    logits, state = engine.forward(prompt_ids, state)     # prefill (grouped per expert)
    logits, state = engine.forward(np.array([tok]), state)  # one decode step

Tiers: disk (`ExpertStore`, memory-mapped, checksummed) → host (`HostCache`,
pinned_host memory — on the CPU backend plain host arrays, since host memory is
the device's own; `host_memory_kind="pinned_host"` forces the staging copy there
too — hard byte budget) → device (`DeviceSlots`, two or more
expert-layer slots). During decode, as soon as layer j has routed its token the
engine predicts layer j+1's expert by applying layer j+1's norm and router to
the current hidden state and starts bringing it to a free slot on a background
thread (disk read, checksum, host→device copy) while layer j's expert computes.
Layer j's route and layer j+1's guess come from one jitted call (one host sync
per expert layer), and the guess is queued behind layer j's own region before
the engine waits for it. How a region is brought in ("same", "delta", "full")
and what a misprediction costs: `perspective_jax.infer.expert_tiers`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.config import PerspectiveConfig
from perspective_jax.config.choices import PREDICTORS
from perspective_jax.config.param_layout import expert_layers
from perspective_jax.config.loader import from_dict
from perspective_jax.errors import UserError
from perspective_jax.infer import compile_clock
from perspective_jax.infer import layers as L
from perspective_jax.modeldir import format as md
from perspective_jax.modeldir.manifest import read_manifest
from perspective_jax.infer.device_slots import DeviceSlots, memory_sharding
from perspective_jax.infer.expert_store import ExpertStore
from perspective_jax.infer.expert_tiers import ExpertTiers
from perspective_jax.infer.host_cache import HostCache
from perspective_jax.modeldir.shared_weights import embedding_table, insert_kernels, load_shared
from perspective_jax.model.cache_io import unflatten_paths
from perspective_jax.model.transformer import init_cache

MB = 1 << 20
KINDS = ("same", "delta", "full")
# Prefetch predictors: "router" applies layer j+1's router to layer j's hidden
# state (SPEC §3.5); "previous" guesses layer j+1's expert of the previous token;
# "auto" uses, per layer, whichever has been right more often so far.


@dataclasses.dataclass
class Stats:
    """Counters of one engine; `report()` turns them into the --stats table."""

    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    compile_s: float = 0.0      # tracing + compiling during feeds (not in prefill/decode)
    transfers: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    bytes_moved: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    predictions: int = 0
    predicted_right: int = 0
    stalls: int = 0
    stall_s: float = 0.0
    cancelled: int = 0          # wrong prefetches stopped part-way through their read
    failed_guesses: int = 0     # wrong prefetches whose read failed (not needed: no error)
    damaged_deltas: list = dataclasses.field(default_factory=list)   # messages; each
    #                             delta failed its checksum and its target loaded in full


def _temp_bytes(lowered) -> int:
    """Bytes of temporaries XLA's memory analysis reports for a lowered call."""
    stats = lowered.compile().memory_analysis()
    return int(getattr(stats, "temp_size_in_bytes", 0) or 0)


class StreamingEngine:
    """Layer-streamed decoding over a model directory (module docstring).

    Budgets: `host_budget_mb` (host tier, read buffers in flight included) and
    `device_budget_mb` (shared weights + `device_slots` regions + decode state) are
    hard limits. `io`: "mmap" or "direct" (O_DIRECT, bypasses the page cache).
    `predictor`: how layer j+1's expert is guessed (PREDICTORS). `host_memory_kind`:
    memory of the host tier — "pinned_host" on an accelerator, plain numpy on the
    CPU backend by default. `pin_before_transfer`: pin a fresh read into the host
    tier before sending it to the device (the old order; default is to send it
    from the read buffer and pin it afterwards on the admit thread).
    `cancel_wrong_reads`: stop a wrong guess still reading when its layer arrives
    (off by default: slower on the 2-core CPU, docs/benchmarks.md).
    `transfer_thread`: read regions on one thread and copy them to the device on
    another, so the disk can read the next region during a host→device copy (off
    by default: not yet measured on an accelerator; on the CPU backend a copy is
    free).
    """

    def __init__(self, model_dir: str, host_budget_mb: float = 1024,
                 device_budget_mb: Optional[float] = None, device_slots: int = 2,
                 prefetch: bool = True, use_deltas: bool = True, warm_start: bool = True,
                 io: str = "mmap", predictor: str = "auto", prefill_chunk: int = 256,
                 host_memory_kind: Optional[str] = None, pin_before_transfer: bool = False,
                 cancel_wrong_reads: bool = False, transfer_thread: bool = False,
                 device=None):
        if predictor not in PREDICTORS:
            raise UserError(f"unknown prefetch predictor {predictor!r}; use one of {PREDICTORS}")
        if device_slots < 2:
            raise UserError(f"--device-slots {device_slots}: the device tier needs at least "
                            "2 slots (the double buffer)")
        if prefill_chunk < 1:
            raise UserError(f"--prefill-chunk {prefill_chunk}: must be >= 1")
        self.predictor, self.prefill_chunk = predictor, prefill_chunk
        self.manifest = read_manifest(model_dir)
        self.cfg: PerspectiveConfig = from_dict(PerspectiveConfig, self.manifest["config"])
        # what a saved conversation is tied to: the exact config, shared weights, experts
        self.identity = md.sha256_bytes(json.dumps(
            {"config": self.manifest["config"],
             "files": {k: v["sha256"] for k, v in sorted(self.manifest["files"].items())}},
            sort_keys=True).encode())
        self.model, self.moe = self.cfg.model, self.cfg.moe
        self.routed = self.model.routed
        self.activation_bits = (self.cfg.ternary.activation_bits
                                if self.cfg.ternary.enabled else 0)
        self.device = device or jax.devices()[0]
        self.prefetch, self.use_deltas = prefetch, use_deltas
        self.pin_before_transfer = pin_before_transfer
        self.stats = Stats()
        flat, quantized = load_shared(model_dir, self.manifest)
        scales = {name: flat.pop(md.scale_key(name)) for name in md.EXPERT_MATRICES
                  if md.scale_key(name) in flat}
        on_device = memory_sharding(self.device, "device")
        table = embedding_table(flat, self.manifest, model_dir)   # float [V, d] or Int8Table
        tree = unflatten_paths(flat)          # numpy: periods are sliced before the upload,
        self.shared_bytes = (sum(a.nbytes for a in flat.values())      # so the device never
                             + sum(k.nbytes for k in quantized.values())    # holds them twice
                             + sum(a.nbytes for a in jax.tree.leaves(table)))
        self.embed_table = jax.device_put(table, on_device)
        self.final_norm = jax.device_put(tree["final_norm"], on_device)
        self.layer_params = [[jax.device_put(jax.tree.map(lambda a, p=p: a[p],
                                                          tree["periods"][f"layer_{i}"]),
                                             on_device)
                              for i in range(len(self.model.layer_pattern))]
                             for p in range(self.model.n_periods)]
        insert_kernels(self.layer_params, quantized, on_device)
        self.expert_layers = expert_layers(self.model)
        self.layer_index = {key: j for j, key in enumerate(self.expert_layers)}
        self.state_bytes = sum(a.nbytes for a in jax.tree.leaves(init_cache(self.model, 1)))
        self.host = self.store = self.slots = self.tiers = None
        self.region_bytes = self.workspace_bytes = 0
        if self.routed:
            self._init_tiers(model_dir, scales, on_device, host_budget_mb, device_budget_mb,
                             device_slots, warm_start, io, host_memory_kind,
                             cancel_wrong_reads, transfer_thread)
        elif device_budget_mb is not None:
            self.workspace_bytes = self._workspace_bytes()
            if self.device_bytes_needed > device_budget_mb * MB:
                raise UserError(self._device_budget_message(device_budget_mb))
        n = len(self.expert_layers)
        self._last_expert: list[Optional[int]] = [None] * n
        self._guesses: list[dict] = [{} for _ in range(n)]
        self._right = [collections.Counter() for _ in range(n)]

    # ------------------------------------------------------------------ setup
    def _init_tiers(self, model_dir, scales, on_device, host_budget_mb, device_budget_mb,
                    device_slots, warm_start, io, host_memory_kind, cancel_wrong_reads,
                    transfer_thread):
        self.store = ExpertStore(model_dir, self.manifest, io=io)
        self.region_bytes = self.store.region_bytes
        if sorted(scales) != sorted(md.EXPERT_MATRICES):
            raise md.ModelDirError(f"{model_dir}: {md.SHARED_FILE} lacks the expert scales "
                                   f"{md.EXPERT_SCALES}/…; re-run perspective-export")
        self.expert_scales = jax.device_put(tuple(scales[n] for n in md.EXPERT_MATRICES),
                                            on_device)
        self.shared_bytes += sum(v.nbytes for v in scales.values())
        if host_memory_kind is None:          # on CPU, host memory is the device's own
            host_memory_kind = "pinned_host" if self.device.platform != "cpu" else "numpy"
        # a host entry is the store's allocation when regions stay numpy (CPU backend)
        entry = self.store.alloc_bytes if host_memory_kind == "numpy" else self.region_bytes
        host_bytes = int(host_budget_mb * MB)
        # read buffers held outside the entries (ExpertTiers.buffers_in_flight)
        staging = self.store.alloc_bytes * ExpertTiers.buffers_in_flight(
            host_memory_kind == "numpy", self.pin_before_transfer, transfer_thread)
        if host_bytes < entry + staging:
            extra = f" plus {staging / MB:.2f} MB of read buffers in flight" if staging else ""
            raise UserError(f"--host-budget-mb {host_budget_mb:g} cannot hold one expert "
                            f"region ({entry / MB:.2f} MB){extra}; raise it")
        self.n_slots = device_slots
        if device_budget_mb is not None:
            self.workspace_bytes = self._workspace_bytes()
        if device_budget_mb is not None and self.device_bytes_needed > device_budget_mb * MB:
            raise UserError(self._device_budget_message(device_budget_mb))
        freqs = self.manifest.get("routing_frequencies")
        priors = np.asarray(freqs, np.float64) if freqs else None
        if host_memory_kind == "numpy":
            place = np.asarray
        else:
            pinned = memory_sharding(self.device, host_memory_kind)
            place = lambda r: jax.device_put(r, pinned).block_until_ready()  # noqa: E731
        self.host_memory_kind = host_memory_kind
        self.host = HostCache(host_bytes, entry, priors, place=place, staging_bytes=staging)
        self.slots = DeviceSlots(device_slots, self.region_bytes, self.device)
        self.warmed = self.host.warm(self.store.read_region) if warm_start else 0
        self.tiers = ExpertTiers(self.store, self.host, self.slots, self.stats,
                                 stage_in_place=host_memory_kind == "numpy",
                                 use_deltas=self.use_deltas,
                                 pin_before_transfer=self.pin_before_transfer,
                                 cancel_wrong_reads=cancel_wrong_reads,
                                 transfer_thread=transfer_thread)

    @property
    def device_bytes_needed(self) -> int:
        """Bytes the engine keeps on the device: shared weights, expert slots, state, and
        (when a device budget is checked) the largest call's temporaries."""
        slots = getattr(self, "n_slots", 0) * self.region_bytes
        return self.shared_bytes + slots + self.state_bytes + self.workspace_bytes

    def _workspace_bytes(self) -> int:
        """Temporaries of the largest call the engine makes, from the compiled
        executables' memory analysis on this backend: the head (an int8 table widens
        one row block to float32) and, for a routed model, one prefill expert call at
        the largest row group (on a GPU the dequantise-then-matmul path decodes the
        expert's matrices to float32). The calls run one after another."""
        cfg, sds = self.model, jax.ShapeDtypeStruct
        like = lambda tree: jax.tree.map(lambda a: sds(a.shape, a.dtype), tree)  # noqa: E731
        head = L.head.lower(cfg, like(self.final_norm), like(self.embed_table),
                            sds((1, cfg.d_model), L.dtype_of(cfg.dtype)))
        return max(_temp_bytes(head), self._prefill_workspace_bytes() if self.routed else 0)

    def _prefill_workspace_bytes(self) -> int:
        """Temporaries of one prefill expert call at the largest row group."""
        cfg, sds = self.model, jax.ShapeDtypeStruct
        rows = 1 << max(self.prefill_chunk - 1, 0).bit_length()
        dt = L.dtype_of(cfg.dtype)
        args = (sds((rows, cfg.d_model), dt), sds((rows, cfg.d_model), dt),
                sds((rows,), jnp.int32), sds((self.region_bytes,), jnp.uint8),
                tuple(sds(s.shape, s.dtype) for s in self.expert_scales),
                sds((), jnp.int32), sds((), jnp.int32))
        return _temp_bytes(L.expert_rows.lower(cfg, self.activation_bits, *args))

    def _device_budget_message(self, budget_mb) -> str:
        work = (f" + workspace {self.workspace_bytes / MB:.2f} MB"
                if self.workspace_bytes else "")
        return (f"--device-budget-mb {budget_mb:g} is too small: shared weights "
                f"{self.shared_bytes / MB:.2f} MB + {getattr(self, 'n_slots', 0)} expert slots × "
                f"{self.region_bytes / MB:.2f} MB + decode state {self.state_bytes / MB:.2f} MB"
                f"{work} = {self.device_bytes_needed / MB:.2f} MB")

    def new_state(self) -> dict:
        """Empty decode state: per (period, layer) caches and the next position."""
        cache = init_cache(self.model, 1)
        return {"layers": [[jax.tree.map(lambda a, p=p: a[p], cache["periods"][f"layer_{i}"])
                            for i in range(len(self.model.layer_pattern))]
                           for p in range(self.model.n_periods)],
                "next_pos": 0}

    # ------------------------------------------------------------------ compute
    def forward(self, tokens: np.ndarray, state: dict):
        """Feed tokens [T] (prefill when T > 1, in chunks); returns (last logits [V], the
        new state). `state` itself is left as it was, so a feed that fails part-way (an
        unreadable expert, Ctrl-C) can be retried or saved from the state before it."""
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        if tokens.size == 0:
            raise UserError("nothing to feed: the token sequence is empty")
        if tokens.min() < 0 or tokens.max() >= self.model.vocab_size:
            raise UserError(f"token ids must lie in [0, {self.model.vocab_size})")
        state = {"layers": [list(row) for row in state["layers"]],
                 "next_pos": state["next_pos"]}          # new lists; the caches are immutable
        t0, c0 = time.perf_counter(), compile_clock.seconds()
        for s in range(0, tokens.size, self.prefill_chunk):
            logits = self._forward_chunk(tokens[s: s + self.prefill_chunk], state)
        logits = np.asarray(logits)[0]
        compiling = min(compile_clock.seconds() - c0, time.perf_counter() - t0)
        self.stats.compile_s += compiling
        dt = time.perf_counter() - t0 - compiling          # the model's time alone
        if tokens.size > 1:
            self.stats.prefill_tokens += tokens.size
            self.stats.prefill_s += dt
        else:
            self.stats.decode_tokens += 1
            self.stats.decode_s += dt
        return logits, state

    def _forward_chunk(self, tokens: np.ndarray, state: dict):
        cfg, t = self.model, tokens.size
        pos0 = state["next_pos"]
        segment_pos = jnp.arange(pos0, pos0 + t, dtype=jnp.int32)[None]
        x = L.embed(cfg, self.embed_table, jnp.asarray(tokens)[None])
        for p in range(cfg.n_periods):
            for i, kind in enumerate(cfg.layer_pattern):
                lp = self.layer_params[p][i]
                h, state["layers"][p][i] = L.mixer(cfg, kind, lp, x, segment_pos,
                                                   state["layers"][p][i])
                if self.routed and kind == "pdr":
                    x = self._routed(self.layer_index[(p, i)], lp, h)
                else:
                    x = L.dense_ffn(cfg, lp, h)
        state["next_pos"] = pos0 + t
        return L.head(cfg, self.final_norm, self.embed_table, x[:, -1])

    def _routed(self, j: int, lp, h):
        cfg = self.model
        if h.shape[1] == 1:                          # decode: one expert, one fused call
            return self._routed_token(j, lp, h)
        hn, idx, gate = L.route(cfg, self.moe, lp, h)
        idx = np.asarray(idx).reshape(-1)
        t = idx.size
        self._last_expert[j] = int(idx[-1])
        hn_flat = hn.reshape(t, cfg.d_model)
        y = jnp.zeros((t, cfg.d_model), hn.dtype)
        for e in np.unique(idx):
            slot = self.tiers.ensure((j, int(e)))
            rows = np.flatnonzero(idx == e)
            padded = np.full(1 << max(len(rows) - 1, 0).bit_length(), rows[0], np.int32)
            padded[: len(rows)] = rows
            y, done = L.expert_rows(cfg, self.activation_bits, y, hn_flat,
                                    jnp.asarray(padded), self.slots.arrays[slot],
                                    self.expert_scales, np.int32(j), np.int32(e))
            self.slots.fence(slot, done)     # refilling this slot waits for this call
        return L.combine(cfg, h, y, gate)

    def _routed_token(self, j: int, lp, h):
        """Decode step of expert layer j: h [1, 1, d] → h + gate · expert(norm(h)).
        Layer j's route and the router's guess for layer j+1 (its norm and router on
        the same h, SPEC §3.5) come back in one host sync; the guess is queued behind
        layer j's region before the engine waits for that region."""
        cfg, nxt = self.model, j + 1
        guess_router = (self.prefetch and nxt < len(self.expert_layers)
                        and self.predictor in ("auto", "router"))
        if guess_router:
            p, i = self.expert_layers[nxt]
            hn, idx, gate, idx_next = L.route_and_guess(cfg, self.moe, lp,
                                                        self.layer_params[p][i], h)
            e, router_guess = (int(v.reshape(-1)[0]) for v in jax.device_get((idx, idx_next)))
        else:
            hn, idx, gate = L.route(cfg, self.moe, lp, h)
            e, router_guess = int(np.asarray(idx).reshape(-1)[0]), None
        self._observe(j, e)
        then = self._predict_next(j, h, router_guess) if self.prefetch else None
        slot = self.tiers.ensure((j, e), then=then)
        return L.expert_token(cfg, self.activation_bits, h, hn, gate,
                              self.slots.arrays[slot], self.expert_scales,
                              np.int32(j), np.int32(e))

    def _predict_next(self, j: int, h, router_guess: Optional[int]):
        """(j+1, expert) to prefetch for this token, or None: the router's guess
        (`router_guess`, computed from layer j's hidden state h — passed along for
        tools/probe_prefetch.py, which wraps this method) or layer j+1's expert of
        the previous token, whichever has been right more often at layer j+1."""
        nxt = j + 1
        if nxt >= len(self.expert_layers):
            return None
        guesses = {}
        if router_guess is not None:
            guesses["router"] = router_guess
        if self.predictor in ("auto", "previous") and self._last_expert[nxt] is not None:
            guesses["previous"] = self._last_expert[nxt]
        if not guesses:
            return None
        self._guesses[nxt] = guesses
        best = max(guesses, key=lambda name: (self._right[nxt][name], name == "router"))
        return nxt, guesses[best]

    def _observe(self, j: int, expert: int) -> None:
        """Score the predictors against the expert layer j actually used."""
        for name, guess in self._guesses[j].items():
            self._right[j][name] += guess == expert
        self._guesses[j] = {}
        self._last_expert[j] = expert

    # ------------------------------------------------------------------ reporting
    def report(self) -> dict:
        s = self.stats
        out = {
            "prefill_tokens": s.prefill_tokens,
            "prefill_tok_per_s": s.prefill_tokens / s.prefill_s if s.prefill_s else 0.0,
            "decode_tokens": s.decode_tokens,
            "decode_tok_per_s": s.decode_tokens / s.decode_s if s.decode_s else 0.0,
            "compile_s": s.compile_s,
            "device_bytes_held": self.device_bytes_needed,
        }
        if self.routed:
            lookups = self.host.hits + self.host.misses
            out.update({
                "transfers": {k: s.transfers[k] for k in KINDS},
                "bytes_moved": {k: s.bytes_moved[k] for k in (*KINDS, "wasted")},
                "disk_bytes_read": self.store.bytes_read,
                "host_cache_hit_rate": self.host.hits / lookups if lookups else 0.0,
                "host_cache_evictions": self.host.evictions,
                "host_peak_bytes": self.host.peak_bytes,
                "host_budget_bytes": self.host.budget_bytes,
                "host_read_buffers_peak": self.tiers.buffers_peak,
                "host_read_buffers_budgeted": self.tiers.buffers_budgeted,
                "prefetch_accuracy": (s.predicted_right / s.predictions
                                      if s.predictions else 0.0),
                "stalls": s.stalls, "stall_s": s.stall_s, "prefetch_cancelled": s.cancelled,
                "prefetch_failed": s.failed_guesses,
                "damaged_deltas": len(s.damaged_deltas),
                "device_slots": self.n_slots,
                "device_expert_regions_peak": self.slots.regions_peak,
                "warm_start_regions": self.warmed,
            })
        rss = _peak_rss_bytes()
        if rss is not None:
            out["process_peak_rss_bytes"] = rss
        mem = self.device.memory_stats() if hasattr(self.device, "memory_stats") else None
        if mem and "peak_bytes_in_use" in mem:
            out["device_peak_bytes_runtime"] = mem["peak_bytes_in_use"]
        return out

    def close(self) -> None:
        """Stop the background threads (a cancellable read in flight is cancelled);
        re-raises a failed prefetch or host-cache admission."""
        if self.tiers is not None:
            try:
                self.tiers.close()
            finally:
                self.store.close()


def _peak_rss_bytes() -> Optional[int]:
    """Peak resident memory of this process (Linux VmHWM), or None elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
