"""The Perspective language model: embedding → scanned periods → norm → tied head.

One period is `cfg.layer_pattern` (default PDR, PDR, PDR, GQA); each layer is

    h = x + Mixer(RMSNorm(x)),    x' = h + FFN(RMSNorm(h))

The periods run under `nn.scan`, so parameters and decode caches carry a
leading [n_periods] axis and compile time does not grow with depth.

    logits, cache = model.apply({"params": p}, tokens, cache=cache)

tokens: [B, T] int; logits: [B, T, V] float32. With `cache` (from
`init_cache`) the call continues a sequence: prefill then step-by-step decode
gives the same logits as one parallel pass.
"""

from __future__ import annotations

import math
from typing import Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from perspective_jax.config import ModelConfig, MoEConfig
from perspective_jax.model.attention import WindowedGQA, init_kv_cache
from perspective_jax.model.layers import RMSNorm, SwiGLU, dtype_of
from perspective_jax.model.pdr import PDRMixer, init_pdr_cache
from perspective_jax.model.routed_ffn import RoutedFFN

MIXERS = {"pdr": PDRMixer, "gqa": WindowedGQA}
_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class ResidualBlock(nn.Module):
    """Pre-norm mixer + pre-norm FFN, each with a residual. x: [B, T, d].
    The FFN after a PDR layer is routed (experts) when `cfg.routed`."""

    cfg: ModelConfig
    kind: str
    moe: MoEConfig = MoEConfig()
    route_mode: str = "nearest"
    route_k: int = 0
    activation_bits: int = 0

    @nn.compact
    def __call__(self, x, segment_pos, cache=None):
        mixed, cache = MIXERS[self.kind](self.cfg, name="mixer")(
            RMSNorm(self.cfg, name="mixer_norm")(x), segment_pos, cache)
        h = x + mixed
        if self.kind == "pdr" and self.cfg.routed:
            ffn = RoutedFFN(self.cfg, self.moe, self.route_mode, self.route_k,
                            self.activation_bits, name="ffn")
        else:
            ffn = SwiGLU(self.cfg, name="ffn")
        out = h + ffn(RMSNorm(self.cfg, name="ffn_norm")(h))
        return out.astype(x.dtype), cache


class Period(nn.Module):
    """One repetition of `layer_pattern`; carry x, scan over the cache slice."""

    cfg: ModelConfig
    moe: MoEConfig = MoEConfig()
    route_mode: str = "nearest"
    route_k: int = 0
    activation_bits: int = 0

    @nn.compact
    def __call__(self, x, segment_pos, cache):
        new_cache = {}
        for i, kind in enumerate(self.cfg.layer_pattern):
            name = f"layer_{i}"
            x, c = ResidualBlock(self.cfg, kind, self.moe, self.route_mode, self.route_k,
                                 self.activation_bits, name=name)(
                x, segment_pos, None if cache is None else cache[name])
            new_cache[name] = c
        return x, (new_cache if cache is not None else None)


def init_cache(cfg: ModelConfig, batch: int) -> dict:
    """Empty decode cache: per-period layer caches stacked on axis 0, plus the
    next position per sequence."""
    one = {}
    for i, kind in enumerate(cfg.layer_pattern):
        one[f"layer_{i}"] = (init_pdr_cache(cfg, batch) if kind == "pdr"
                             else init_kv_cache(cfg, batch))
    stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (cfg.n_periods, *a.shape)), one)
    return {"periods": stacked, "next_pos": jnp.zeros((batch,), jnp.int32)}


class PerspectiveLM(nn.Module):
    """tokens [B, T] → (logits [B, T, V], cache). `moe` sizes the routed FFNs
    when `cfg.routed`; `route_mode`/`route_k` pick the routing perspective
    (nearest, kth, antipode, random — see `moe.routed_ffn.select_expert`);
    `activation_bits=8` fake-quantises expert inputs per token (ternary stage)."""

    cfg: ModelConfig
    moe: MoEConfig = MoEConfig()
    route_mode: str = "nearest"
    route_k: int = 0
    activation_bits: int = 0

    def setup(self):
        cfg = self.cfg
        self.embed = nn.Embed(
            cfg.vocab_size, cfg.d_model,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(1.0 / math.sqrt(cfg.d_model)), ("vocab", "embed")),
            param_dtype=dtype_of(cfg.param_dtype), name="embed")
        block = Period
        if cfg.remat != "none":
            block = nn.remat(Period, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        self.periods = nn.scan(
            block,
            variable_axes={"params": 0, "aux": 0},
            split_rngs={"params": True, "route": True},
            in_axes=(nn.broadcast, 0),
            out_axes=0,
            length=cfg.n_periods,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, self.moe, self.route_mode, self.route_k, self.activation_bits, name="periods")
        self.final_norm = RMSNorm(cfg, name="final_norm")

    def __call__(self, tokens: jax.Array, segment_pos: Optional[jax.Array] = None,
                 cache: Optional[dict] = None):
        cfg = self.cfg
        b, t = tokens.shape
        if segment_pos is None:
            start = cache["next_pos"][:, None] if cache is not None else 0
            segment_pos = start + jnp.arange(t, dtype=jnp.int32)[None, :]
            segment_pos = jnp.broadcast_to(segment_pos, (b, t))
        chex.assert_shape(segment_pos, (b, t))
        x = self.embed(tokens).astype(dtype_of(cfg.dtype)) * math.sqrt(cfg.d_model)
        x, period_cache = self.periods(x, segment_pos,
                                       None if cache is None else cache["periods"])
        x = self.final_norm(x)
        logits = self.embed.attend(x.astype(jnp.float32))
        chex.assert_shape(logits, (b, t, cfg.vocab_size))
        if cache is None:
            return logits, None
        return logits, {"periods": period_cache, "next_pos": segment_pos[:, -1] + 1}


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8,
                moe: MoEConfig = MoEConfig()) -> dict:
    """Unboxed parameter pytree of a fresh model."""
    model = PerspectiveLM(cfg, moe)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    variables = jax.jit(model.init)(rng, tokens)
    return nn.meta.unbox(variables)["params"]


def abstract_params(cfg: ModelConfig, moe: MoEConfig = MoEConfig()) -> dict:
    """Parameter shapes/dtypes via `jax.eval_shape` — no memory is allocated."""
    return jax.eval_shape(lambda r: init_params(cfg, r, moe=moe), jax.random.key(0))


def logical_axes(cfg: ModelConfig, moe: MoEConfig = MoEConfig()) -> dict:
    """Logical axis names of every parameter (same tree as `init_params`)."""
    model = PerspectiveLM(cfg, moe)
    boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32)),
                           jax.random.key(0))
    return nn.get_partition_spec(boxed)["params"]
