"""The streaming engine's jitted per-layer calls.

The engine runs the network one layer at a time so it can stream experts. What
the in-memory model computes comes from the model's own `ResidualBlock` parts —
the same functions `PerspectiveLM` runs, so the two cannot drift apart — jitted
per (config, layer kind, part) with the static arguments as jit keys:

    mixer:     h = x + Mixer(RMSNorm(x))               part="mix" (LoRA adapters)
    route:     hn, e, gate = RMSNorm(h), router(hn)     part="route" (routing policy)
    dense_ffn: h + SwiGLU(RMSNorm(h))                  part="ffn"
    combine:   h + y · gate                            routed_ffn.gated_residual

What is the engine's own: the embedding and head on an int8 table (row blocks,
embedding_int8) and the final transform before the head; experts on packed 2-bit
ternary regions, (x·T)·scale via `kernels_pallas.ternary_matmul`, in row groups
(prefill, batched decode) with a fence for the slot, or one fused
expert-and-residual call (decode); route + next layer's guesses in one call; the
head + the next token's layer-0 guess (learned heads) in one call.
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
from perspective_jax.model.extensions import Route
from perspective_jax.model.layers import RMSNorm, dtype_of
from perspective_jax.model.routed_ffn import PREDICTOR, gated_residual, predictor_logits
from perspective_jax.model.transformer import ResidualBlock
from perspective_jax.quant.ternary import quantize_activations_int8


@functools.partial(jax.jit, static_argnums=(0,))
def embed(cfg: ModelConfig, table, tokens):
    """tokens [B, T] → x [B, T, d]; `table` is [V, d] float or an `Int8Table`."""
    dt = dtype_of(cfg.dtype)
    rows = (int8_embedding.embed_rows(table, tokens, dt)
            if isinstance(table, int8_embedding.Int8Table) else table[tokens].astype(dt))
    return rows * math.sqrt(cfg.d_model)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def mixer(cfg: ModelConfig, kind: str, adapter_scale: float, lp, x, segment_pos, cache,
          adapters=None):
    """x [B, T, d] → (h, new cache): the block's part "mix" (`adapters`: this layer's
    LoRA subtree of one period, or None)."""
    return ResidualBlock(cfg, kind, adapter_scale=adapter_scale).apply(
        {"params": lp}, x, segment_pos, cache, 0, adapters, part="mix")


def _route(cfg: ModelConfig, moe: MoEConfig, policy: Route, layer: int, lp, h,
           segment_pos, period, cache=None):
    return ResidualBlock(cfg, "pdr", moe, policy=policy, layer=layer).apply(
        {"params": lp}, h, segment_pos, cache, period, part="route")


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def route(cfg: ModelConfig, moe: MoEConfig, policy: Route, layer: int, lp, h,
          segment_pos, period, cache=None):
    """h [B, T, d] → (hn [B, T, d], expert [B, T], gate [B, T], cache): the block's part
    "route" of layer `layer` of period `period` (both seed the random policy); `cache`
    (the layer's `PDRCache`, or None) carries the router's context average, returned
    advanced past these tokens."""
    return _route(cfg, moe, policy, layer, lp, h, segment_pos, period, cache)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def route_and_guess(cfg: ModelConfig, moe: MoEConfig, policy: Route, layer: int,
                    layer_next: int, kinds: tuple, lp, lp_next, h, segment_pos, period,
                    period_next, cache=None, cache_next=None):
    """Decode: `route(lp, h, cache)` and the guesses `kinds` for the next expert layer's
    expert (SPEC §3.5), in one call: "router" = the expert layer `lp_next`'s router
    applied to the same h with its context average so far (`cache_next`); "learned" =
    argmax of layer `lp`'s predictor head on hn (see `infer.predictor`).
    h [B, T, d] → (hn, expert [B, T], gate [B, T], cache, guesses [len(kinds), B, T]
    in the order of `kinds`)."""
    hn, idx, gate, cache = _route(cfg, moe, policy, layer, lp, h, segment_pos, period,
                                  cache)
    guesses = []
    for kind in kinds:
        if kind == "router":
            guesses.append(_route(cfg, moe, policy, layer_next, lp_next, h, segment_pos,
                                  period_next, cache_next)[1])
        else:
            logits = predictor_logits(lp["ffn"][PREDICTOR]["w"], hn)
            guesses.append(jnp.argmax(logits, -1).astype(idx.dtype))
    return hn, idx, gate, cache, jnp.stack(guesses)


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
    return gated_residual(h, y, gate)


@functools.partial(jax.jit, static_argnums=(0, 1))
def expert_out(cfg: ModelConfig, activation_bits: int, x, codes, scales, j, e):
    """x [M, d] → expert e of expert layer j applied to it [M, d] (no residual, no
    fence: what the adaptation walk differentiates, `infer.tangent_walk`)."""
    return _expert_swiglu(cfg, activation_bits, codes, _scales_at(scales, j, e), x)


@functools.partial(jax.jit, static_argnums=(0,))
def combine(cfg: ModelConfig, h, y, gate):
    """h [B, T, d] + y [B·T, d] · gate [B, T]: the routed block's residual."""
    return gated_residual(h, y, gate)


@functools.partial(jax.jit, static_argnums=(0, 1))
def dense_ffn(cfg: ModelConfig, kind: str, lp, h):
    """h → h + SwiGLU(RMSNorm(h)): the block's part "ffn" (a dense-FFN layer)."""
    return ResidualBlock(cfg, kind).apply({"params": lp}, h, None, part="ffn")


@functools.partial(jax.jit, static_argnums=(0,))
def head(cfg: ModelConfig, final_norm, table, x):
    """x [B, d] → logits [B, V] (float32); `table` is [V, d] float or an `Int8Table`."""
    return tied_head(cfg, table, normed(cfg, final_norm, x))


@functools.partial(jax.jit, static_argnums=(0,))
def head_and_guess(cfg: ModelConfig, final_norm, table, w_next_token, x):
    """x [B, d] → (logits [B, V], the next-token head's guess of the next token's
    layer-0 expert [B]: argmax of `predictor_logits(w_next_token, RMSNorm(x))`)."""
    xn = normed(cfg, final_norm, x)
    return tied_head(cfg, table, xn), first_layer_guess(w_next_token, xn)


@jax.jit
def first_layer_guess(w_next_token, xn):
    """xn [B, d] (the final normed state, before any final transform) → the next-token
    head's guess of the next token's layer-0 expert [B]."""
    return jnp.argmax(predictor_logits(w_next_token, xn), -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0,))
def normed(cfg: ModelConfig, final_norm, x):
    """x [B, d] → RMSNorm(x) [B, d] float32 (what the final transform and the head see)."""
    return RMSNorm(cfg).apply({"params": final_norm}, x).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0,))
def tied_head(cfg: ModelConfig, table, xn):
    """xn [B, d] float32 → logits [B, V]."""
    if isinstance(table, int8_embedding.Int8Table):
        return int8_embedding.head_logits(table, xn, cfg.vocab_size)
    return jnp.dot(xn, table.astype(jnp.float32).T)


@functools.partial(jax.jit, static_argnums=(0,))
def final_transform(transform, xn, state):
    """The Extensions final transform on xn [B, d] → (xn' [B, d], info {name: [B]})."""
    out, info = transform(xn[:, None], state)
    return out[:, 0], {k: v[:, 0] for k, v in dict(info).items()}


@functools.partial(jax.jit, static_argnums=(0, 1))
def head_and_check(cfg: ModelConfig, transform, final_norm, table, x, state):
    """The plain head and whether the transform would move each state: x [B, d] →
    (logits [B, V + 1] whose last column is 1.0 where `transform.moves(xn, state)` —
    one matrix–vector product for the safety projection, most states being inside —
    so one transfer brings both; xn [B, d])."""
    xn = normed(cfg, final_norm, x)
    moves = transform.moves(xn, state).astype(jnp.float32)[:, None]
    return jnp.concatenate([tied_head(cfg, table, xn), moves], axis=-1), xn


@functools.partial(jax.jit, static_argnums=(0, 1))
def transformed_tail(cfg: ModelConfig, transform, table, xn, state):
    """xn [B, d] → (logits [B, V] of the transformed states, info packed as [B, K]
    float32 in sorted key order)."""
    out, info = transform(xn[:, None], state)
    info = dict(info)
    packed = jnp.stack([info[k][:, 0].astype(jnp.float32) for k in sorted(info)], axis=-1)
    return tied_head(cfg, table, out[:, 0]), packed
