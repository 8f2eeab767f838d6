"""What adaptation runs on: the in-memory model or the streaming engine, behind one
interface, so the update loop (`adapt.loop`) is the same for both (SPEC §3.8).

    target = InMemoryTarget(cfg, params)          # PerspectiveLM, weights in memory
    target = StreamedTarget(engine)               # experts streamed disk → host → device
    target.loss(windows, lora, coords)            # mean next-token loss (nats)
    target.loss_and_derivatives(windows, lora, tangents, coords)  # (L, d [K] = ∇_lora L·v_k)
    target.view_logits(windows, lora, coords, policy)      # [B, T, V], one routing view

windows [B, T+1] int; lora the tree of `model.extensions.init_lora`; tangents the same
tree with a leading axis K; coords {layer_i: [P, E, 3]} expert positions of the
routed layers on the torus (None: the trained ones, `positions()`), applied by
replacing the routers' offsets (`coords.with_positions`). Both compute the same
function of the same weights: the streamed derivatives are those of the in-memory
model with the exported expert values (tests/adapt/test_streamed_tangents.py).
"""

from __future__ import annotations

import contextlib
import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.adapt import coords as C
from perspective_jax.config import PerspectiveConfig
from perspective_jax.errors import UserError
from perspective_jax.infer.tangent_walk import next_token_loss, window_loss_and_tangents
from perspective_jax.model.extensions import NEAREST, Extensions
from perspective_jax.model.transformer import PerspectiveLM


def check_windows(windows, vocab_size: int) -> np.ndarray:
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise UserError(f"adaptation windows must be [B, T+1] with B, T >= 1; got "
                        f"{windows.shape}")
    if windows.min() < 0 or windows.max() >= vocab_size:
        raise UserError(f"token ids must lie in [0, {vocab_size})")
    return windows


class InMemoryTarget:
    """PerspectiveLM with `params` (every weight in memory); `scale` the LoRA scale.
    Derivatives are forward mode through the whole model, `tangents_per_pass`
    directions at a time (default all K): jvp, not linearize, so nothing is stored
    across layers — what is alive is one layer's primal values and its tangents."""

    def __init__(self, cfg: PerspectiveConfig, params, scale: float = 1.0,
                 tangents_per_pass: int = 0):
        self.cfg, self.params, self.scale = cfg, params, scale
        bits = cfg.ternary.activation_bits if cfg.ternary.enabled else 0
        self.model = PerspectiveLM(cfg.model, cfg.moe, activation_bits=bits)
        self.vocab_size = cfg.model.vocab_size

        def logits(params, inputs, lora, policy):
            ext = Extensions(route=policy, adapters=lora, adapter_scale=scale)
            return self.model.apply({"params": params}, inputs, ext=ext)[0]

        def loss(params, windows, lora):
            out = logits(params, windows[:, :-1], lora, NEAREST)
            return next_token_loss(out.reshape(-1, out.shape[-1]), windows[:, 1:].reshape(-1))

        def derivatives(params, windows, lora, tangents):
            along = jax.vmap(lambda t: jax.jvp(lambda a: loss(params, windows, a),
                                               (lora,), (t,)))
            k = jax.tree.leaves(tangents)[0].shape[0]
            per = k if tangents_per_pass <= 0 else min(tangents_per_pass, k)
            if k % per:
                raise UserError(f"{k} directions do not split into passes of {per}")
            if per == k:
                values, d = along(tangents)
            else:
                chunks = jax.tree.map(lambda a: a.reshape(k // per, per, *a.shape[1:]),
                                      tangents)
                values, d = jax.lax.map(along, chunks)
            return values.reshape(-1)[0], d.reshape(-1)

        self._logits = jax.jit(logits, static_argnums=(3,))
        self._loss = jax.jit(loss)
        self._derivatives = jax.jit(derivatives)
        self.loss_fn = loss                   # (params, windows, lora) → L: for jax.grad

    def positions(self) -> dict:
        return C.positions(self.params, self.cfg)

    def _params(self, coords):
        return self.params if coords is None else C.with_positions(self.params, coords,
                                                                   self.cfg)

    def loss(self, windows, lora, coords=None) -> float:
        windows = check_windows(windows, self.vocab_size)
        return float(self._loss(self._params(coords), jnp.asarray(windows), lora))

    def loss_and_derivatives(self, windows, lora, tangents, coords=None):
        windows = check_windows(windows, self.vocab_size)
        value, d = self._derivatives(self._params(coords), jnp.asarray(windows), lora,
                                     tangents)
        return float(value), np.asarray(d)

    def view_logits(self, windows, lora, coords=None, policy=NEAREST) -> np.ndarray:
        windows = check_windows(windows, self.vocab_size)
        return np.asarray(self._logits(self._params(coords), jnp.asarray(windows[:, :-1]),
                                       lora, policy))


class StreamedTarget:
    """The streaming engine (`infer.engine.StreamingEngine`): weights as exported,
    experts brought in layer by layer; `scale` the LoRA scale. Derivatives are taken
    `rows_per_pass` windows at a time and averaged (all windows have T targets), so
    what an update holds on the device beyond decoding's weights is one pass's x and
    K tangents [K, rows, T, d] and its logits, whatever the batch."""

    def __init__(self, engine, scale: float = 1.0, rows_per_pass: int = 1):
        if rows_per_pass < 1:
            raise UserError(f"rows_per_pass {rows_per_pass}: must be >= 1")
        self.engine, self.scale, self.rows_per_pass = engine, scale, rows_per_pass
        self.on_layer = None                # tools: called after each layer of a pass
        self.cfg = engine.cfg
        self.vocab_size = engine.model.vocab_size
        self._trained = C.engine_positions(engine)

    def positions(self) -> dict:
        return {k: v.copy() for k, v in self._trained.items()}

    @contextlib.contextmanager
    def _routed_by(self, coords):
        """The engine with its routers at `coords` for the duration (None: as trained)."""
        if coords is None:
            yield self.engine.layer_params
            return
        saved = self.engine.layer_params
        self.engine.layer_params = C.engine_layer_params(self.engine, coords)
        try:
            yield self.engine.layer_params
        finally:
            self.engine.layer_params = saved

    def view_logits(self, windows, lora, coords=None, policy=NEAREST) -> np.ndarray:
        windows = check_windows(windows, self.vocab_size)
        ext = Extensions(route=policy, adapters=lora, adapter_scale=self.scale)
        out = []
        with self._routed_by(coords):
            for row in windows:
                logits, _ = self.engine.forward(row[:-1], self.engine.new_state(), ext=ext,
                                                all_logits=True)
                out.append(logits)
        return np.stack(out)

    def loss(self, windows, lora, coords=None) -> float:
        windows = check_windows(windows, self.vocab_size)
        logits = self.view_logits(windows, lora, coords)
        return float(next_token_loss(jnp.asarray(logits.reshape(-1, logits.shape[-1])),
                                     jnp.asarray(windows[:, 1:].reshape(-1))))

    def loss_and_derivatives(self, windows, lora, tangents, coords=None):
        windows = check_windows(windows, self.vocab_size)
        losses, ds = [], []
        with self._routed_by(coords) as layer_params:
            for s in range(0, len(windows), self.rows_per_pass):
                part = windows[s: s + self.rows_per_pass]
                loss, d = window_loss_and_tangents(self.engine, part, lora, tangents,
                                                   self.scale, layer_params, self.on_layer)
                losses.append(loss * len(part))
                ds.append(d * len(part))
        return float(sum(losses) / len(windows)), np.sum(ds, 0) / len(windows)

