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
from perspective_jax.model.extensions import (NEAREST, Extensions, Route, final_hidden,
                                              inject_vector)
from perspective_jax.model.extensions import NONE as NO_EXTENSIONS
from perspective_jax.model.layers import RMSNorm, SwiGLU, constrain_batch, dtype_of, flat_dot
from perspective_jax.model.pdr import PDRMixer, init_pdr_cache
from perspective_jax.model.routed_ffn import (NEXT_TOKEN_PREDICTOR, PREDICTOR, ExpertPredictor,
                                              RoutedFFN)

MIXERS = {"pdr": PDRMixer, "gqa": WindowedGQA}
_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


PARTS = ("block", "mix", "route", "ffn")


class ResidualBlock(nn.Module):
    """One layer, pre-norm mixer + pre-norm FFN, each with a residual; x: [B, T, d].

        h  = x + Mixer(RMSNorm(x))                       part="mix"   → (h, cache)
        x' = h + SwiGLU(RMSNorm(h))                      part="ffn"   (dense FFN)
        x' = h + FFN_e*(RMSNorm(h)) · gate               routed (after PDR, cfg.routed):
             e*, gate from the router                    part="route" → (RMSNorm(h), e*,
                                                         gate, cache with the router's
                                                         context average advanced)

    part="block" (default) runs the whole layer → (x', cache). The streaming engine
    calls the parts one by one (its experts come from disk between "route" and the
    gated residual, `routed_ffn.gated_residual`), so the two cannot drift apart.
    `period` (traced under the period scan) and `layer` seed the random perspective."""

    cfg: ModelConfig
    kind: str
    moe: MoEConfig = MoEConfig()
    activation_bits: int = 0
    policy: Route = NEAREST
    layer: int = 0
    adapter_scale: float = 1.0

    @property
    def routed(self) -> bool:
        return self.kind == "pdr" and self.cfg.routed

    @nn.compact
    def __call__(self, x, segment_pos, cache=None, period=0, adapters=None,
                 part: str = "block"):
        cfg = self.cfg
        if part in ("block", "mix"):
            mixer = MIXERS[self.kind](cfg, name="mixer") if self.kind == "gqa" else \
                PDRMixer(cfg, self.adapter_scale, name="mixer")
            mixed, cache = mixer(RMSNorm(cfg, name="mixer_norm")(x), segment_pos, cache,
                                 adapters)
            h = x + mixed
            if part == "mix":
                return h, cache
        else:
            h = x
        hn = RMSNorm(cfg, name="ffn_norm")(h)
        if not self.routed:
            if part == "route":
                raise ValueError(f"layer kind {self.kind!r} of this model is not routed")
            out = h + SwiGLU(cfg, name="ffn")(hn)
        else:
            ffn = RoutedFFN(cfg, self.moe, self.policy, self.activation_bits, name="ffn")
            state = None if cache is None else cache.route
            if part == "route":
                idx, gate, state = ffn(hn, segment_pos, period, self.layer, route_only=True,
                                       route_state=state)
                return hn, idx, gate, (None if cache is None else cache._replace(route=state))
            if part == "ffn":
                raise ValueError("part='ffn' is the dense FFN; a routed layer is "
                                 "'route', its experts, then gated_residual")
            y, state = ffn(hn, segment_pos, period, self.layer, route_state=state)
            out = h + y
            if cache is not None:
                cache = cache._replace(route=state)
        out = out.astype(x.dtype)
        return (out, cache) if part == "block" else out


class Period(nn.Module):
    """One repetition of `layer_pattern`; carry x, scan over the cache slice and the
    period index (which the random perspective and the injection read)."""

    cfg: ModelConfig
    moe: MoEConfig = MoEConfig()
    activation_bits: int = 0
    ext: Extensions = NO_EXTENSIONS

    @nn.compact
    def __call__(self, x, segment_pos, cache, period=0, adapters=None):
        cfg, ext = self.cfg, self.ext
        new_cache = {}
        x = constrain_batch(x)
        for i, kind in enumerate(cfg.layer_pattern):
            name = f"layer_{i}"
            layer_adapters = None if adapters is None else adapters.get(name)
            x, c = ResidualBlock(cfg, kind, self.moe, self.activation_bits, ext.route, i,
                                 ext.adapter_scale, name=name)(
                x, segment_pos, None if cache is None else cache[name], period, layer_adapters)
            x = constrain_batch(x)
            new_cache[name] = c
            if ext.inject_layer is not None and ext.inject_layer % len(cfg.layer_pattern) == i:
                target = ext.inject_layer // len(cfg.layer_pattern)
                x = jnp.where(period == target, x + inject_vector(ext, x), x)
        return x, (new_cache if cache is not None else None)


def init_cache(cfg: ModelConfig, batch: int) -> dict:
    """Empty decode cache: per-period layer caches (`PDRCache` / `KVCache`) stacked on
    axis 0, plus the next position per sequence."""
    one = {}
    for i, kind in enumerate(cfg.layer_pattern):
        one[f"layer_{i}"] = (init_pdr_cache(cfg, batch) if kind == "pdr"
                             else init_kv_cache(cfg, batch))
    stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (cfg.n_periods, *a.shape)), one)
    return {"periods": stacked, "next_pos": jnp.zeros((batch,), jnp.int32)}


def _embedding(cfg: ModelConfig, name=None) -> nn.Embed:
    """The tied token embedding / output head table [V, d]."""
    return nn.Embed(cfg.vocab_size, cfg.d_model,
                    embedding_init=nn.with_logical_partitioning(
                        nn.initializers.normal(1.0 / math.sqrt(cfg.d_model)),
                        ("vocab", "embed")),
                    param_dtype=dtype_of(cfg.param_dtype), name=name)


def embed_tokens(cfg: ModelConfig, params: dict, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] → the embedding rows [B, T, d] as the model looks them up (before
    the √d scale and the cast to cfg.dtype)."""
    return _embedding(cfg).apply({"params": params["embed"]}, tokens)


class PerspectiveLM(nn.Module):
    """tokens [B, T] → (logits [B, T, V], cache). `moe` sizes the routed FFNs when
    `cfg.routed`; `activation_bits=8` fake-quantises expert inputs per token (ternary
    stage). `ext` (`extensions.Extensions`, per call) picks the routing perspective,
    transforms the final hidden state, injects into the residual stream, adds LoRA
    adapters; None is the plain model. A routed model also holds the next-token expert
    head (`routed_ffn.ExpertPredictor` on the final normed state, before any final
    transform), whose logits [B, T, E] it sows as aux "next_token_logits"."""

    cfg: ModelConfig
    moe: MoEConfig = MoEConfig()
    activation_bits: int = 0

    @nn.compact
    def __call__(self, tokens: jax.Array, segment_pos: Optional[jax.Array] = None,
                 cache: Optional[dict] = None, ext: Optional[Extensions] = None):
        cfg = self.cfg
        ext = NO_EXTENSIONS if ext is None else ext
        b, t = tokens.shape
        if segment_pos is None:
            start = cache["next_pos"][:, None] if cache is not None else 0
            segment_pos = start + jnp.arange(t, dtype=jnp.int32)[None, :]
            segment_pos = jnp.broadcast_to(segment_pos, (b, t))
        chex.assert_shape(segment_pos, (b, t))
        embed = _embedding(cfg, name="embed")
        block = Period
        if cfg.remat != "none":
            block = nn.remat(Period, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        periods = nn.scan(
            block,
            variable_axes={"params": 0, "aux": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, 0, 0, 0),
            out_axes=0,
            length=cfg.n_periods,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, self.moe, self.activation_bits, ext, name="periods")
        x = embed(tokens).astype(dtype_of(cfg.dtype)) * math.sqrt(cfg.d_model)
        adapters = None if ext.adapters is None else ext.adapters["periods"]
        x, period_cache = periods(x, segment_pos,
                                  None if cache is None else cache["periods"],
                                  jnp.arange(cfg.n_periods, dtype=jnp.int32), adapters)
        xn = RMSNorm(cfg, name="final_norm")(x).astype(jnp.float32)
        if cfg.routed:
            self.sow("aux", "next_token_logits",
                     ExpertPredictor(self.moe.num_experts, name=NEXT_TOKEN_PREDICTOR)(xn))
        xn, info = final_hidden(xn, ext)
        if info:
            self.sow("intermediates", "final_info", info)
        logits = flat_dot(xn, embed.embedding.astype(jnp.float32).T)   # tied head
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


def is_predictor_path(path: str) -> bool:
    """Whether a '/'-joined parameter path is an expert-predictor head's weight."""
    parts = path.split("/")
    return parts[-2:] == [NEXT_TOKEN_PREDICTOR, "w"] or parts[-3:] == ["ffn", PREDICTOR, "w"]


def fill_absent_predictors(params) -> tuple[dict, list[str]]:
    """(params with every head still a `jax.ShapeDtypeStruct` — absent from a checkpoint
    saved before the heads existed — set to its fresh value, zeros; the paths of any
    *other* absent leaf, which the caller reports)."""
    other = []

    def fill(path, leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if not is_predictor_path(name):
            other.append(name)
            return leaf
        return jnp.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, params), other
