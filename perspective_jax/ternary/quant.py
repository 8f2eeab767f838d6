"""Quantisation-aware training of ternary experts (SPEC §3.4, BitNet b1.58).

    W_t = clip(round(W / (mean|W| + ε)), −1, 1) · mean|W|      (per expert matrix)
    forward uses W_t, backward passes the gradient straight through to W (STE).

Progressive schedule: at fraction φ only the φ share of each matrix's weights
with the largest magnitude is ternarised (the rest stay float), φ stepping
through `ternary.schedule` in equal phases of the stage. Quantisation is a
transform of the parameter tree applied before `model.apply`, so the network
modules are unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from perspective_jax.config import ModelConfig

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")
_EPS = 1e-8


def absmean_scale(w: jax.Array) -> jax.Array:
    """mean|W| over the last two axes (one scale per expert matrix), keepdims."""
    return jnp.mean(jnp.abs(w), axis=(-2, -1), keepdims=True)


def ternarize(w: jax.Array) -> jax.Array:
    """The ternary value W_t (no gradient trick)."""
    scale = absmean_scale(w)
    return jnp.clip(jnp.round(w / (scale + _EPS)), -1, 1) * scale


def ternary_ste(w: jax.Array, fraction=1.0) -> jax.Array:
    """W with its `fraction` largest-magnitude entries (per matrix) replaced by
    their ternary values; gradient is the identity (straight-through)."""
    wt = ternarize(w)
    fraction = jnp.asarray(fraction, jnp.float32)
    flat = jnp.abs(w).reshape(*w.shape[:-2], -1)
    threshold = jnp.quantile(flat, 1.0 - fraction, axis=-1)[..., None, None]
    mask = (jnp.abs(w) >= threshold) & (fraction > 0)
    mixed = jnp.where(mask, wt, w)
    return w + jax.lax.stop_gradient(mixed - w)


def schedule_fraction(schedule: tuple[float, ...], step, total_steps: int):
    """Fraction ternarised at `step` of a stage of `total_steps` (equal phases)."""
    table = jnp.asarray(schedule, jnp.float32)
    phase = jnp.minimum((step * len(schedule)) // max(total_steps, 1), len(schedule) - 1)
    return table[phase]


def quantize_experts(params: dict, cfg: ModelConfig, fraction=1.0) -> dict:
    """Apply `ternary_ste` to every routed expert matrix of a parameter tree."""
    out = jax.tree.map(lambda a: a, params)
    for i, kind in enumerate(cfg.layer_pattern):
        if kind != "pdr":
            continue
        ffn = dict(out["periods"][f"layer_{i}"]["ffn"])
        for name in EXPERT_WEIGHTS:
            ffn[name] = ternary_ste(ffn[name], fraction)
        out["periods"][f"layer_{i}"]["ffn"] = ffn
    return out


def quantize_activations_int8(x: jax.Array) -> jax.Array:
    """Per-token absmax 8-bit fake quantisation with STE: x ≈ round(x·127/max|x|)·max|x|/127."""
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0 + _EPS
    q = jnp.clip(jnp.round(x / scale), -127, 127) * scale
    return x + jax.lax.stop_gradient(q - x)
