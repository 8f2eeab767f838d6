"""Layer-streamed inference over a model directory (SPEC §3.5).

    engine = StreamingEngine(model_dir, EngineOptions(host_budget_mb=1024))
    state = engine.new_state()                              # an EngineState
    logits, state = engine.forward(prompt_ids, state)       # prefill (grouped per expert)
    logits, state = engine.forward(np.array([tok]), state)  # one decode step
    logits, states = engine.step(states, tokens)            # one step of B sequences
    tokenizer = load_model_tokenizer(model_dir, engine.manifest)   # sha256-checked

Tiers: disk (`ExpertStore`, memory-mapped, checksummed) → host (`HostCache`,
pinned_host memory — on the CPU backend plain host arrays, since host memory is
the device's own; `host_memory_kind="pinned_host"` forces the staging copy there
too — hard byte budget) → device (`DeviceSlots`, two or more
expert-layer slots). During decode, as soon as layer j has routed its token the
engine predicts layer j+1's expert (`predictor.Predictor`) and starts bringing it
to a free slot on a background thread (disk read, checksum, host→device copy)
while layer j's expert computes. Layer j's route and the guesses for layer j+1
(the router's, the learned head's) come from one jitted call (one host sync per
expert layer), and the guess is queued behind layer j's own region before the
engine waits for it. With learned heads, the head call also guesses the next
token's layer-0 expert from the final state, and that guess is queued at once. How a region
is brought in ("same", "delta", "full") and what a misprediction costs:
`perspective_jax.infer.expert_tiers`.

Batched decode (`step`): B independent sequences, each with its own position, PDR
states and KV ring, advance one token together; at every routed layer their
tokens are grouped by expert, so each expert a step needs is brought to the
device once for the whole batch. Sequences join and leave between steps.
"""

from __future__ import annotations

import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.config import PerspectiveConfig
from perspective_jax.config.param_layout import expert_layers, routed_positions
from perspective_jax.config.loader import from_dict
from perspective_jax.errors import UserError
from perspective_jax.infer import compile_clock
from perspective_jax.infer import compute as L
from perspective_jax.infer import state as S
from perspective_jax.infer.device_budget import MB, DeviceBudget, workspace_bytes
from perspective_jax.infer.device_slots import DeviceSlots, memory_sharding
from perspective_jax.infer.expert_store import ExpertStore
from perspective_jax.infer.expert_tiers import ExpertTiers
from perspective_jax.infer.host_cache import HostCache
from perspective_jax.infer.options import EngineOptions
from perspective_jax.infer.predictor import Predictor
from perspective_jax.infer.state import EngineState
from perspective_jax.infer.stats import Stats, report
from perspective_jax.modeldir import format as md
from perspective_jax.data.byte_tokenizer import ByteTokenizer
from perspective_jax.data.tokenizer import SentencePieceTokenizer
from perspective_jax.modeldir.manifest import (model_identity, read_manifest, tokenizer_file,
                                               verified_path)
from perspective_jax.modeldir.shared_weights import embedding_table, insert_kernels, load_shared
from perspective_jax.model.cache_io import unflatten_paths
from perspective_jax.model.extensions import (NEAREST, Extensions, check_extensions,
                                              inject_after, layer_adapters)
from perspective_jax.model.routed_ffn import NEXT_TOKEN_PREDICTOR, PREDICTOR
from perspective_jax.model.transformer import init_cache


def _chunk_extensions(ext: Optional[Extensions], start: int, stop: int, total: int,
                      all_logits: bool) -> Optional[Extensions]:
    """`ext` for the chunk start:stop of a feed of `total` tokens (`forward`)."""
    if ext is None or ext.final_transform is None:
        return ext
    if not all_logits:
        return ext if stop == total else ext.replace(final_transform=None, final_state=None)
    cut = getattr(ext.final_state, "positions", None)
    return ext if cut is None else ext.replace(final_state=cut(start, stop, total))


def load_model_tokenizer(model_dir: str, manifest: Optional[dict] = None):
    """The tokenizer file the manifest names, once it matches the manifest's sha256
    (a damaged or swapped tokenizer changes every token: a one-line ModelDirError)."""
    manifest = read_manifest(model_dir) if manifest is None else manifest
    path = verified_path(model_dir, manifest, tokenizer_file(manifest))
    return ByteTokenizer() if manifest["tokenizer"] == "byte" else SentencePieceTokenizer(path)


class StreamingEngine:
    """Layer-streamed decoding over a model directory (module docstring); `options`
    (EngineOptions) holds the budgets and streaming choices. `manifest`: the model
    directory's manifest when the caller has already read it (read once per start)."""

    def __init__(self, model_dir: str, options: EngineOptions = EngineOptions(),
                 manifest: Optional[dict] = None, device=None):
        if not isinstance(options, EngineOptions):
            raise TypeError("options must be an EngineOptions")
        self.options = o = options
        self.predictor_mode, self.prefill_chunk = o.predictor, o.prefill_chunk
        self.manifest = read_manifest(model_dir) if manifest is None else manifest
        parsed = getattr(self.manifest, "config", None)     # read_manifest parsed it once
        self.cfg: PerspectiveConfig = (parsed if parsed is not None else
                                       from_dict(PerspectiveConfig, self.manifest["config"]))
        # what a saved conversation is tied to: the exact config, shared weights, experts
        self.identity = model_identity(self.manifest)
        self.model, self.moe = self.cfg.model, self.cfg.moe
        self.routed = self.model.routed
        self.activation_bits = (self.cfg.ternary.activation_bits
                                if self.cfg.ternary.enabled else 0)
        self.device = device or jax.devices()[0]
        self.prefetch, self.use_deltas = o.prefetch, o.use_deltas
        self.pin_before_transfer = o.pin_before_transfer
        self.stats = Stats()
        self.final_info = None     # the last feed's final-transform info ({name: [N]})
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
        self.region_bytes = self.workspace_bytes = self.n_slots = 0
        if self.routed:
            self._init_tiers(model_dir, scales, on_device)
        else:
            self._check_device_budget()
        self.token_head, self.learned_predictor = (self._learned_heads(tree, on_device)
                                                   if self.routed else (None, "dense model"))
        self.predictor = Predictor(o.predictor, len(self.expert_layers),
                                   learned=self.token_head is not None, stats=self.stats)

    # ------------------------------------------------------------------ setup
    def _init_tiers(self, model_dir, scales, on_device):
        o = self.options
        self.store = ExpertStore(model_dir, self.manifest, io=o.io)
        self.region_bytes = self.store.region_bytes
        if sorted(scales) != sorted(md.EXPERT_MATRICES):
            raise md.ModelDirError(f"{model_dir}: {md.SHARED_FILE} lacks the expert scales "
                                   f"{md.EXPERT_SCALES}/…; re-run perspective-export")
        self.expert_scales = jax.device_put(tuple(scales[n] for n in md.EXPERT_MATRICES),
                                            on_device)
        self.shared_bytes += sum(v.nbytes for v in scales.values())
        kind = o.host_memory_kind
        if kind is None:                      # on CPU, host memory is the device's own
            kind = "pinned_host" if self.device.platform != "cpu" else "numpy"
        # a host entry is the store's allocation when regions stay numpy (CPU backend)
        entry = self.store.alloc_bytes if kind == "numpy" else self.region_bytes
        host_bytes = int(o.host_budget_mb * MB)
        # read buffers held outside the entries (ExpertTiers.buffers_in_flight)
        self.transfer_thread = (o.transfer_thread if o.transfer_thread is not None
                                else self.device.platform != "cpu")
        staging = self.store.alloc_bytes * ExpertTiers.buffers_in_flight(
            kind == "numpy", self.pin_before_transfer, self.transfer_thread)
        if host_bytes < entry + staging:
            extra = f" plus {staging / MB:.2f} MB of read buffers in flight" if staging else ""
            raise UserError(f"--host-budget-mb {o.host_budget_mb:g} cannot hold one expert "
                            f"region ({entry / MB:.2f} MB){extra}; raise it")
        self.n_slots = o.device_slots
        self._check_device_budget()
        freqs = self.manifest.get("routing_frequencies")
        priors = np.asarray(freqs, np.float64) if freqs else None
        if kind == "numpy":
            place = np.asarray
        else:
            pinned = memory_sharding(self.device, kind)
            place = lambda r: jax.device_put(r, pinned).block_until_ready()  # noqa: E731
        self.host_memory_kind = kind
        self.host = HostCache(host_bytes, entry, priors, place=place, staging_bytes=staging)
        self.slots = DeviceSlots(o.device_slots, self.region_bytes, self.device)
        self.hubs_pinned = self._pin_hubs() if o.pin_hubs and self.use_deltas else 0
        self.warmed = self.host.warm(self.store.read_region) if o.warm_start else 0
        self.tiers = ExpertTiers(self.store, self.host, self.slots, self.stats,
                                 stage_in_place=kind == "numpy", use_deltas=self.use_deltas,
                                 pin_before_transfer=self.pin_before_transfer,
                                 cancel_wrong_reads=o.cancel_wrong_reads,
                                 transfer_thread=self.transfer_thread)

    def _pin_hubs(self) -> int:
        """Pin each expert layer's hub in the host cache (while that leaves at least half
        its entries to the rest), so a load the cache misses can read the hub's delta
        rather than the region; a hub with deltas kept to fewer than half the layer's
        experts (experts too far apart) is not worth its entry. Returns how many."""
        n = 0
        for j in range(self.store.n_layers):
            hub = self.store.hub(j)
            if hub is not None and 2 * len(self.store.delta_targets(j, hub)) >= hub:
                if not self.host.pin((j, hub), self.store.read_region):
                    break
                n += 1
        return n

    def _learned_heads(self, tree: dict, on_device):
        """(the next-token head [d, E] on the device, or None; what the --stats report
        says of the learned predictor). Heads that are absent (an export from before
        they existed) or all zero (never trained: a run made before them) are not
        used: the router's guesses take their place."""
        layer_heads = [tree["periods"][f"layer_{i}"]["ffn"].get(PREDICTOR, {}).get("w")
                       for i in routed_positions(self.model)]
        token = tree.get(NEXT_TOKEN_PREDICTOR, {}).get("w")
        if token is None or any(w is None for w in layer_heads):
            return None, "absent from the model directory (router guesses instead)"
        if not (np.any(token) and any(np.any(w) for w in layer_heads)):
            return None, "untrained (all zero; router guesses instead)"
        return jax.device_put(token, on_device), "available"

    def _check_device_budget(self) -> None:
        """With a device budget: measure the largest call's temporaries, then check."""
        if self.options.device_budget_mb is None:
            return
        expert = ((self.region_bytes, self.expert_scales, self.activation_bits)
                  if self.routed else None)
        self.workspace_bytes = workspace_bytes(self.model, self.final_norm, self.embed_table,
                                               self.prefill_chunk, expert)
        self.budget.check(self.options.device_budget_mb)

    @property
    def budget(self) -> DeviceBudget:
        return DeviceBudget(self.shared_bytes, self.n_slots, self.region_bytes,
                            self.state_bytes, self.workspace_bytes)

    @property
    def device_bytes_needed(self) -> int:
        """Bytes the engine keeps on the device: shared weights, expert slots, state, and
        (when a device budget is checked) the largest call's temporaries."""
        return self.budget.needed

    def new_state(self) -> EngineState:
        """Empty decode state of one sequence."""
        return EngineState.from_cache(init_cache(self.model, 1))

    # ------------------------------------------------------------------ compute
    def _check_tokens(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        if tokens.size == 0:
            raise UserError("nothing to feed: the token sequence is empty")
        if tokens.min() < 0 or tokens.max() >= self.model.vocab_size:
            raise UserError(f"token ids must lie in [0, {self.model.vocab_size})")
        return tokens

    def forward(self, tokens: np.ndarray, state: EngineState,
                ext: Optional[Extensions] = None, all_logits: bool = False):
        """Feed tokens [T] (prefill when T > 1, in chunks); returns (last logits [V], the
        new state) — or every position's logits [T, V] with `all_logits` (scoring text).
        `state` itself is left as it was, so a feed that fails part-way (an unreadable
        expert, Ctrl-C) can be retried or saved from the state before it.
        `ext` (model.extensions.Extensions) is honoured as `PerspectiveLM` honours it.
        Its final transform runs on the logits returned: the last position's (the
        chunks before it compute theirs without it), or with `all_logits` every
        position's — a final_state with `positions(start, stop, total)` (a per-position
        safety mask) is cut to each chunk; `final_info` then covers all T positions."""
        tokens = self._check_tokens(tokens)
        self._check_ext(ext)
        layers = [list(row) for row in state.layers]   # new lists; the caches are immutable
        pos = state.next_pos
        t0, c0 = time.perf_counter(), compile_clock.seconds()
        parts, infos, self.final_info = [], [], None
        for s in range(0, tokens.size, self.prefill_chunk):
            chunk = tokens[s: s + self.prefill_chunk]
            segment_pos = jnp.arange(pos, pos + chunk.size, dtype=jnp.int32)[None]
            chunk_ext = _chunk_extensions(ext, s, s + chunk.size, tokens.size, all_logits)
            logits = self._forward_chunk(chunk[None], segment_pos, layers, chunk_ext,
                                         all_logits, guess_next=s + chunk.size == tokens.size)
            parts.append(logits)
            if chunk_ext is not None and chunk_ext.final_transform is not None:
                infos.append(self.final_info)
            pos += chunk.size
        if len(infos) > 1:
            self.final_info = {k: np.concatenate([i[k] for i in infos]) for k in infos[0]}
        logits = (np.concatenate([np.asarray(p) for p in parts]) if all_logits
                  else np.asarray(logits)[0])
        self._account(t0, c0, prefill=tokens.size if tokens.size > 1 else 0,
                      decode=1 if tokens.size == 1 else 0)
        return logits, EngineState(tuple(tuple(row) for row in layers), pos)

    def step(self, states: list, tokens, ext: Optional[Extensions] = None,
             keep_states: bool = True) -> tuple[np.ndarray, Optional[list]]:
        """One decode step of B independent sequences: `states[b]` (an EngineState, from
        `new_state` + `forward` or an earlier step) is fed `tokens[b]`. Returns (logits
        [B, V], the B new states); the given states are left as they were. Each routed
        layer groups the B tokens by expert: an expert is brought in once per step.
        `ext` applies to every sequence (an `inject` of shape [B, d]: one row each).
        `keep_states=False` returns None for the states (a step whose rows end there,
        as MPD's views: the per-row slicing is skipped)."""
        if not states or len(states) != len(tokens):
            raise UserError(f"a batched step needs one token per sequence; got "
                            f"{len(tokens)} tokens for {len(states)} sequences")
        logits, batch = self.step_batch(S.batch_of(states), tokens, ext)
        return logits, (S.unbatch(batch) if keep_states else None)

    def step_batch(self, batch: S.Batch, tokens, ext: Optional[Extensions] = None
                   ) -> tuple[np.ndarray, S.Batch]:
        """`step` on sequences kept stacked (`infer.state.Batch`): returns (logits
        [B, V], the next Batch); `batch` itself is left as it was."""
        if batch.size != len(tokens):
            raise UserError(f"a batched step needs one token per sequence; got "
                            f"{len(tokens)} tokens for {batch.size} sequences")
        tokens = self._check_tokens(tokens)
        self._check_ext(ext)
        t0, c0 = time.perf_counter(), compile_clock.seconds()
        self.final_info = None
        layers = [list(r) for r in batch.layers]
        pos = batch.next_pos
        logits = self._forward_chunk(tokens[:, None], jnp.asarray(pos)[:, None], layers, ext,
                                     guess_next=True)
        logits = np.asarray(logits)
        self._account(t0, c0, prefill=0, decode=batch.size)
        self.stats.batch_steps += 1
        return logits, S.Batch(tuple(tuple(r) for r in layers), pos + 1)

    def _account(self, t0: float, c0: float, prefill: int, decode: int) -> None:
        compiling = min(compile_clock.seconds() - c0, time.perf_counter() - t0)
        self.stats.compile_s += compiling
        dt = time.perf_counter() - t0 - compiling          # the model's time alone
        if prefill:
            self.stats.prefill_tokens += prefill
            self.stats.prefill_s += dt
        else:
            self.stats.decode_tokens += decode
            self.stats.decode_s += dt

    def _check_ext(self, ext: Optional[Extensions]) -> None:
        if ext is not None:
            if not isinstance(ext, Extensions):
                raise TypeError("ext must be a model.extensions.Extensions")
            check_extensions(ext, self.model)

    def _forward_chunk(self, tokens: np.ndarray, segment_pos, layers: list,
                       ext: Optional[Extensions] = None, all_positions: bool = False,
                       guess_next: bool = False):
        """tokens [B, T] at positions segment_pos [B, T] through every layer, updating
        `layers[p][i]` in place; returns the last position's logits [B, V] (every
        position's, [B·T, V], with `all_positions`). `guess_next` (one sequence, the
        feed's last chunk): prefetch the next token's layer-0 expert the learned
        next-token head guesses, when the predictor uses it."""
        cfg, n = self.model, len(self.model.layer_pattern)
        scale = 1.0 if ext is None else ext.adapter_scale
        policy = NEAREST if ext is None else ext.route
        x = L.embed(cfg, self.embed_table, jnp.asarray(tokens))
        for p in range(cfg.n_periods):
            for i, kind in enumerate(cfg.layer_pattern):
                lp = self.layer_params[p][i]
                h, layers[p][i] = L.mixer(cfg, kind, scale, lp, x, segment_pos, layers[p][i],
                                          layer_adapters(ext, p, i))
                if self.routed and kind == "pdr":
                    x = self._routed(self.layer_index[(p, i)], lp, h, segment_pos, layers,
                                     policy)
                else:
                    x = L.dense_ffn(cfg, kind, lp, h)
                x = inject_after(x, ext, p * n + i)
        last = x.reshape(-1, cfg.d_model) if all_positions else x[:, -1]
        guess = (guess_next and not all_positions and tokens.shape[0] == 1 and self.prefetch
                 and self.routed)
        learned = guess and self.predictor.uses_learned
        if ext is None or ext.final_transform is None:
            if not learned:
                logits = L.head(cfg, self.final_norm, self.embed_table, last)
                if guess:
                    self._prefetch_first(None)
                return logits
            logits, first = jax.device_get(L.head_and_guess(
                cfg, self.final_norm, self.embed_table, self.token_head, last))
            self._prefetch_first(int(first[0]))
            return logits
        logits = self._transformed_head(last, ext)
        if learned:
            xn = L.normed(cfg, self.final_norm, last)
            self._prefetch_first(int(np.asarray(L.first_layer_guess(self.token_head, xn))[0]))
        elif guess:
            self._prefetch_first(None)
        return logits

    def _prefetch_first(self, guess: Optional[int]) -> None:
        """Queue the next token's layer-0 expert (`Predictor.predict_first` from the
        next-token head's `guess`, None when not computed) as `ExpertTiers.ensure` queues
        a `then=` guess: behind everything asked so far, keeping the last expert layer's
        slot. Nothing is queued while another guess is pending."""
        if self.tiers.pending():
            return
        key = self.predictor.predict_first(guess)
        if key is not None:
            last = self.predictor.last[-1]
            protect = (len(self.expert_layers) - 1, last if last is not None else -1)
            self.tiers.prefetch(key, protect)

    def _transformed_head(self, last, ext: Extensions):
        """The head with the final transform; its info ({name: [N]} numpy) is kept in
        `self.final_info`. A transform with `moves` (the safety projection) is checked
        first, fused with the plain head, and runs only when it moves some state (its
        time then: `Stats.final_s`, the states it ran on: `Stats.final_rows`)."""
        transform, state = ext.final_transform, ext.final_state
        if not hasattr(transform, "moves"):
            xn = L.normed(self.model, self.final_norm, last)
            xn, info = L.final_transform(transform, xn, state)
            self.final_info = jax.device_get(info)
            return L.tied_head(self.model, self.embed_table, xn)
        both, xn = L.head_and_check(self.model, transform, self.final_norm,
                                    self.embed_table, last, state)
        both = np.asarray(both)
        logits, moves = both[:, :-1], both[:, -1] > 0
        self.stats.final_checked += int(moves.shape[0])
        if not moves.any():
            self.final_info = transform.idle_info(moves.shape[0])
            return logits
        t0, c0 = time.perf_counter(), compile_clock.seconds()
        logits, packed = L.transformed_tail(self.model, transform, self.embed_table, xn, state)
        packed = np.asarray(packed)
        dt = time.perf_counter() - t0
        self.stats.final_s += max(0.0, dt - min(compile_clock.seconds() - c0, dt))
        self.stats.final_rows += int(moves.shape[0])
        self.final_info = {k: packed[:, i].astype(transform.INFO_DTYPES[k])
                           for i, k in enumerate(sorted(transform.INFO_DTYPES))}
        return logits

    def _routed(self, j: int, lp, h, segment_pos, layers, policy=NEAREST):
        """Expert layer j on h [B, T, d]; its cache `layers[p][i]` (the router's context
        average) is advanced in place."""
        cfg = self.model
        b, t = h.shape[:2]
        if b * t == 1:                               # decode: one expert, one fused call
            return self._routed_token(j, lp, h, segment_pos, layers, policy)
        p, i = self.expert_layers[j]
        hn, idx, gate, layers[p][i] = L.route(cfg, self.moe, policy, i, lp, h, segment_pos,
                                              np.int32(p), layers[p][i])
        idx = np.asarray(idx).reshape(-1)
        self.predictor.drop(j)                       # a guess for it goes unscored
        if b == 1:                                   # prefill: the previous token's expert
            self.predictor.last[j] = int(idx[-1])
        hn_flat = hn.reshape(b * t, cfg.d_model)
        y = jnp.zeros((b * t, cfg.d_model), hn.dtype)
        for e in np.unique(idx):                     # each expert once, for all its rows
            slot = self.tiers.ensure((j, int(e)))
            rows = np.flatnonzero(idx == e)
            padded = np.full(1 << max(len(rows) - 1, 0).bit_length(), rows[0], np.int32)
            padded[: len(rows)] = rows
            y, done = L.expert_rows(cfg, self.activation_bits, y, hn_flat,
                                    jnp.asarray(padded), self.slots.arrays[slot],
                                    self.expert_scales, np.int32(j), np.int32(e))
            self.slots.fence(slot, done)     # refilling this slot waits for this call
        return L.combine(cfg, h, y, gate)

    def _routed_token(self, j: int, lp, h, segment_pos, layers, policy=NEAREST):
        """Decode step of expert layer j: h [1, 1, d] → h + gate · expert(norm(h)).
        Layer j's route and the guesses for layer j+1 the predictor uses (the router's:
        its norm and router on the same h; the learned head's on layer j's router
        input; SPEC §3.5) come back in one host sync; the guess is queued behind
        layer j's region before the engine waits for that region."""
        cfg, nxt = self.model, j + 1
        kinds = ()
        if self.prefetch and nxt < len(self.expert_layers):
            kinds = tuple(k for k, used in (("router", self.predictor.uses_router),
                                            ("learned", self.predictor.uses_learned)) if used)
        p, i = self.expert_layers[j]
        if kinds:
            p2, i2 = self.expert_layers[nxt]
            hn, idx, gate, layers[p][i], guessed = L.route_and_guess(
                cfg, self.moe, policy, i, i2, kinds, lp, self.layer_params[p2][i2], h,
                segment_pos, np.int32(p), np.int32(p2), layers[p][i], layers[p2][i2])
            idx, guessed = jax.device_get((idx, guessed))
            e = int(idx.reshape(-1)[0])
            guesses = {k: int(g.reshape(-1)[0]) for k, g in zip(kinds, guessed)}
        else:
            hn, idx, gate, layers[p][i] = L.route(cfg, self.moe, policy, i, lp, h,
                                                  segment_pos, np.int32(p), layers[p][i])
            e, guesses = int(np.asarray(idx).reshape(-1)[0]), {}
        self._observe(j, e)
        then = self._predict_next(j, h, guesses) if self.prefetch else None
        slot = self.tiers.ensure((j, e), then=then)
        return L.expert_token(cfg, self.activation_bits, h, hn, gate,
                              self.slots.arrays[slot], self.expert_scales,
                              np.int32(j), np.int32(e))

    # hooks around the predictor (tools/probe_prefetch.py wraps them)
    def _predict_next(self, j: int, h, guesses: dict):
        """(j+1, expert) to prefetch from `guesses` ({"router": e, "learned": e}); `h`
        (layer j's hidden state, which they came from) is passed along for tools that
        inspect it."""
        return self.predictor.predict(j, guesses)

    def _observe(self, j: int, expert: int) -> None:
        self.predictor.observe(j, expert)

    # ------------------------------------------------------------------ reporting
    def report(self) -> dict:
        return report(self)

    def close(self) -> None:
        """Stop the background threads (a cancellable read in flight is cancelled);
        re-raises a failed prefetch or host-cache admission."""
        if self.tiers is not None:
            try:
                self.tiers.close()
            finally:
                self.store.close()
