"""Per-layer compute of the streaming engine, built from the model's own modules.

The engine runs the network one layer at a time so it can stream experts; each
function here is the exact computation `ResidualBlock` performs, jitted on its
own (one compilation per layer kind and token-group size):

    mixer:    h = x + Mixer(RMSNorm(x))                   (PDR or windowed GQA)
    route:    hn = RMSNorm(h); e = argmin_e d²(z, pos_e); gate as the model's
    experts:  y[rows] = SwiGLU_e(hn[rows]) with packed 2-bit ternary weights,
              (x·T)·scale via `kernels_pallas.ternary_matmul`
    dense:    h + SwiGLU(RMSNorm(h))
    head:     logits = RMSNorm(x) · Eᵀ                    (tied embedding; int8 E
                                                           in row blocks, embedding_int8)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from kernels_pallas.ternary_matmul import ternary_matmul
from perspective_jax.config import ModelConfig, MoEConfig
from perspective_jax.quant import embedding_int8 as int8_embedding
from perspective_jax.modeldir.format import RegionLayout
from perspective_jax.model.layers import RMSNorm, SwiGLU, dtype_of
from perspective_jax.model.transformer import MIXERS
from perspective_jax.model.routed_ffn import TorusRouter
from perspective_jax.quant.ternary import quantize_activations_int8


@functools.partial(jax.jit, static_argnums=(0,))
def embed(cfg: ModelConfig, table, tokens):
    """tokens [B, T] → x [B, T, d]; `table` is [V, d] float or an `Int8Table`."""
    dt = dtype_of(cfg.dtype)
    rows = (int8_embedding.embed_rows(table, tokens, dt)
            if isinstance(table, int8_embedding.Int8Table) else table[tokens].astype(dt))
    return rows * math.sqrt(cfg.d_model)


@functools.partial(jax.jit, static_argnums=(0, 1))
def mixer(cfg: ModelConfig, kind: str, lp, x, segment_pos, cache):
    y = RMSNorm(cfg).apply({"params": lp["mixer_norm"]}, x)
    mixed, cache = MIXERS[kind](cfg).apply({"params": lp["mixer"]}, y, segment_pos, cache)
    return x + mixed, cache


def _route(cfg: ModelConfig, moe: MoEConfig, lp, h):
    """h [B, T, d] → (hn [B, T, d], expert [B, T], gate [B, T]) as `RoutedFFN` computes."""
    hn = RMSNorm(cfg).apply({"params": lp["ffn_norm"]}, h)
    idx, gate, _, _ = TorusRouter(cfg, moe).apply({"params": lp["ffn"]["router"]}, hn)
    if moe.gate == "straight_through":
        gate = gate / gate                # the value of g / stop_gradient(g)
    return hn, idx, gate


route = jax.jit(_route, static_argnums=(0, 1))


@functools.partial(jax.jit, static_argnums=(0, 1))
def route_and_guess(cfg: ModelConfig, moe: MoEConfig, lp, lp_next, h):
    """Decode: `route(lp, h)` and the expert layer `lp_next`'s router applies to the
    same h (the prefetch guess for the next expert layer, SPEC §3.5), in one call:
    h [B, T, d] → (hn, expert [B, T], gate [B, T], guessed next expert [B, T])."""
    hn, idx, gate = _route(cfg, moe, lp, h)
    return hn, idx, gate, _route(cfg, moe, lp_next, h)[1]


def _expert_swiglu(cfg: ModelConfig, activation_bits: int, codes, scales, x):
    """x [M, d] through one expert whose flat 2-bit region is `codes`;
    scales = (gate, up, down) scales, each [1] or [N]."""
    parts = RegionLayout(cfg.d_model, cfg.d_ff).split(codes)
    dt = dtype_of(cfg.dtype)
    quant = quantize_activations_int8 if activation_bits == 8 else (lambda a: a)
    x = quant(x.astype(dt))
    g = ternary_matmul(x, parts["w_gate"], scales[0])
    u = ternary_matmul(x, parts["w_up"], scales[1])
    hidden = quant((jax.nn.silu(g) * u).astype(dt))
    return ternary_matmul(hidden, parts["w_down"], scales[2]).astype(dt)


def _scales_at(scales, j, e):
    """(gate, up, down) scales [L, E, S] of all experts → those of expert e of layer j."""
    return tuple(s[j, e] for s in scales)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2,))
def expert_rows(cfg: ModelConfig, activation_bits: int, y, hn, rows, codes, scales, j, e):
    """Prefill: (y [N, d] with rows `rows` (padded by repeating an entry) set to
    expert(hn[rows]), a scalar ready when this call is done: the fence that the
    slot holding `codes` waits for before it is refilled); `codes` is expert e of
    expert layer j."""
    out = _expert_swiglu(cfg, activation_bits, codes, _scales_at(scales, j, e), hn[rows])
    return y.at[rows].set(out), out[0, 0]


@functools.partial(jax.jit, static_argnums=(0, 1))
def expert_token(cfg: ModelConfig, activation_bits: int, h, hn, gate, codes, scales, j, e):
    """Decode: h, hn [1, 1, d], gate [1, 1] → h + gate · expert(hn) in one call (scale
    lookup, expert, combine: no eager ops between route and the next mixer)."""
    y = _expert_swiglu(cfg, activation_bits, codes, _scales_at(scales, j, e),
                       hn.reshape(1, cfg.d_model))
    return _combine(h, y, gate)


def _combine(h, y, gate):
    """h [B, T, d] + y [B·T, d] · gate [B, T] (the routed FFN's gated residual)."""
    return (h + y.reshape(h.shape) * gate[..., None].astype(y.dtype)).astype(h.dtype)


@functools.partial(jax.jit, static_argnums=(0,))
def combine(cfg: ModelConfig, h, y, gate):
    return _combine(h, y, gate)


@functools.partial(jax.jit, static_argnums=(0,))
def dense_ffn(cfg: ModelConfig, lp, h):
    hn = RMSNorm(cfg).apply({"params": lp["ffn_norm"]}, h)
    return (h + SwiGLU(cfg).apply({"params": lp["ffn"]}, hn)).astype(h.dtype)


@functools.partial(jax.jit, static_argnums=(0,))
def head(cfg: ModelConfig, final_norm, table, x):
    """x [B, d] → logits [B, V] (float32); `table` is [V, d] float or an `Int8Table`."""
    xn = RMSNorm(cfg).apply({"params": final_norm}, x).astype(jnp.float32)
    if isinstance(table, int8_embedding.Int8Table):
        return int8_embedding.head_logits(table, xn, cfg.vocab_size)
    return jnp.dot(xn, table.astype(jnp.float32).T)
