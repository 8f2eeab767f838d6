"""Routing frequencies of the calibration text, computed one period at a time.

    rp = RoutingPass(cfg, tokens)            # tokens [1, T] int32 (None: uniform)
    rp.start({"embed": ...})                 # the first period's inputs, per chunk
    for p in range(n_periods):
        rp.period(p, period_params)          # routes period p's layers; advances
    freqs = rp.frequencies()                 # [L_expert, E], rows sum to 1

The text is cut into chunks of `chunk` tokens, each run as its own sequence
(positions from 0, no cache) as `PerspectiveLM` would run it; a chunk shorter
than 2 tokens ends the text. An expert layer's row is the share of tokens its
router sent to each expert (uniform where no token was routed). Only one
period's parameters and the chunks' activations [T, d] are held.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.config import PerspectiveConfig
from perspective_jax.config.param_layout import expert_layers, routed_positions
from perspective_jax.export.calibrate import period_input
from perspective_jax.model.transformer import Period

CHUNK = 512


class RoutingPass:
    """Routing counts per (expert layer, expert) over the calibration chunks."""

    def __init__(self, cfg: PerspectiveConfig, tokens, chunk: int = CHUNK):
        self.cfg = cfg
        self.positions = routed_positions(cfg.model)
        e = cfg.moe.num_experts
        self.counts = np.zeros((len(expert_layers(cfg.model)), e))
        self.pieces = []
        n = 0 if tokens is None else tokens.shape[1]
        for s in range(0, n - 1, chunk):
            part = tokens[:, s: s + chunk]
            if part.shape[1] < 2:
                break
            self.pieces.append(part)
        self.x = []
        period = Period(cfg.model, cfg.moe)

        def run(period_params, x, p):
            b, t, _ = x.shape
            pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
            (y, _), aux = period.apply({"params": period_params}, x, pos, None, p,
                                       mutable=["aux"])
            return y, {i: aux["aux"][f"layer_{i}"]["ffn"]["counts"] for i in self.positions}

        self._run = jax.jit(run)

    def start(self, params) -> None:
        """The first period's inputs of every chunk; `params` needs only "embed"."""
        self.x = [period_input(self.cfg.model, params, part) for part in self.pieces]

    def compile(self, period_like) -> None:
        """Compile the period's program for every chunk length now, before any weights
        are held (`period_like`: one period's ShapeDtypeStructs)."""
        p = jax.ShapeDtypeStruct((), jnp.int32)
        for x in {x.shape: x for x in self.x}.values():
            self._run.lower(period_like, jax.ShapeDtypeStruct(x.shape, x.dtype), p).compile()

    def period(self, p: int, period_params) -> None:
        """Route every chunk through period p and count; advance the chunks."""
        for k, x in enumerate(self.x):
            self.x[k], counts = self._run(period_params, x, jnp.int32(p))
            for n, i in enumerate(self.positions):
                c = counts[i]
                self.counts[p * len(self.positions) + n] += np.asarray(
                    c[0] if isinstance(c, tuple) else c)

    def frequencies(self) -> np.ndarray:
        """[L_expert, E] share of calibration tokens routed to each expert."""
        self.x = []
        e = self.counts.shape[1]
        total = self.counts.sum(1, keepdims=True)
        return np.where(total > 0, self.counts / np.maximum(total, 1), 1.0 / e)
