"""The PDR token mixer (SPEC §3.1) as a Flax module.

    p_t = W_p x_t + b_p,  λ_t = min(log sigmoid(p_t), log γ_max)   log-decay [d]
    k_t = W_k x_t,  q_t = W_q x_t ∈ R^r,  v_t = W_v x_t ∈ R^d
    S_t = diag(exp λ_t) S_{t-1} + v_t k_tᵀ,   o_t = W_o (S_t q_t)

Init: W_p = I + noise·N(0, 1)/√d, sigmoid(b_p) = pdr_init_decay; W_q is
scaled by 1/√r so that q·k is O(1) at init. The recurrence runs in float32.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from perspective_jax.config import ModelConfig
from perspective_jax.model.extensions import lora_delta
from perspective_jax.model.layers import (Projection, dtype_of, flat_dot, logical,
                                          quantized_param)
from kernels_pallas.pdr_scan import pdr_scan, pdr_step


class PDRCache(NamedTuple):
    """Decode state of one PDR layer: S [B, d, r] (float32), and the routed FFN after
    it's context average `route` [B, 4] (float32: Σ λ^{t-s} W_route h_s and Σ λ^{t-s};
    `routed_ffn.context_average`), which the mixer passes through unchanged."""

    state: jax.Array
    route: jax.Array


ROUTE_STATE = 4            # the router's context average: 3 coordinates + its weight


def init_pdr_cache(cfg: ModelConfig, batch: int) -> PDRCache:
    return PDRCache(state=jnp.zeros((batch, cfg.d_model, cfg.pdr_rank), jnp.float32),
                    route=jnp.zeros((batch, ROUTE_STATE), jnp.float32))


class PDRMixer(nn.Module):
    """x: [B, T, d] → ([B, T, d], cache). With cache=None the state starts at 0
    and no cache is returned (training). `adapters` {name: {"a", "b"}} adds a LoRA
    term to the projections it names (W_p, W_q, W_k, W_v, W_o; `extensions.lora_delta`)."""

    cfg: ModelConfig
    adapter_scale: float = 1.0

    def _perspective_init(self, key, shape, dtype):
        d = shape[0]
        noise = self.cfg.pdr_init_noise / math.sqrt(d)
        return (jnp.eye(d) + noise * jax.random.normal(key, shape)).astype(dtype)

    @nn.compact
    def __call__(self, x: jax.Array, segment_pos: jax.Array,
                 cache: Optional[PDRCache] = None, adapters: Optional[dict] = None
                 ) -> tuple[jax.Array, Optional[PDRCache]]:
        cfg = self.cfg
        adapters = adapters or {}

        def lora(y, name, inp):                       # y + scale·(inp·A)·B, if adapted
            delta = lora_delta(inp, adapters.get(name), self.adapter_scale)
            return y if delta is None else (y + delta).astype(y.dtype)

        b, t, d = x.shape
        chex.assert_shape(segment_pos, (b, t))
        pdt = dtype_of(cfg.param_dtype)
        # W_p stored as [in, out] like every projection: p = x @ W_p + b_p; at inference
        # of a --shared-bits export it is a QuantizedKernel (group codes, used packed).
        w_p_codes = quantized_param(self, "w_p")
        if w_p_codes is None:
            w_p = self.param("w_p", logical(self._perspective_init, ("embed", "pdr_rows")),
                             (d, d), pdt)
        b_p = self.param("b_p", logical(nn.initializers.constant(
            math.log(cfg.pdr_init_decay / (1.0 - cfg.pdr_init_decay))), ("pdr_rows",)),
            (d,), pdt)
        if w_p_codes is not None:
            p = w_p_codes.contract(x.astype(jnp.float32), 1)
        else:
            p = flat_dot(x.astype(jnp.float32), w_p.astype(jnp.float32))
        p = lora(p, "w_p", x) + b_p.astype(jnp.float32)
        log_decay = jnp.minimum(jax.nn.log_sigmoid(p),                 # [B,T,d] < 0
                                math.log(cfg.pdr_max_decay))
        self.sow("intermediates", "log_decay", log_decay)
        k = lora(Projection((cfg.pdr_rank,), ("embed", "pdr_rank"), cfg, name="w_k")(x),
                 "w_k", x)
        q = lora(Projection((cfg.pdr_rank,), ("embed", "pdr_rank"), cfg, name="w_q",
                            init_scale=1.0 / cfg.pdr_rank)(x), "w_q", x)
        v = lora(Projection((d,), ("embed", "pdr_rows"), cfg, name="w_v")(x), "w_v", x)
        k, q, v = (a.astype(jnp.float32) for a in (k, q, v))

        state = cache.state if cache is not None else jnp.zeros(
            (b, d, cfg.pdr_rank), jnp.float32)
        if t == 1 and cache is not None:
            y, new_state = pdr_step(log_decay[:, 0], k[:, 0], q[:, 0], v[:, 0], state)
            y = y[:, None]
        else:
            y, new_state = pdr_scan(log_decay, k, q, v, state, impl=cfg.pdr_impl,
                                    chunk=cfg.pdr_chunk, sub=cfg.pdr_sub)
        y = y.astype(dtype_of(cfg.dtype))
        out = lora(Projection((d,), ("pdr_rows", "embed"), cfg, name="w_o")(y), "w_o", y)
        return out, (cache._replace(state=new_state) if cache is not None else None)
