"""Quantisation-aware training of ternary experts (SPEC §3.4, BitNet b1.58).

    W_t = clip(round(W / (mean|W| + ε)), −1, 1) · mean|W|
    forward uses W_t, backward passes the gradient straight through to W (STE).

The mean is taken per expert matrix (`ternary.scale_granularity=tensor`) or per
output feature, i.e. per column n of W [K, N] used as x @ W — a row of the
[out, in] matrix — (`row`).

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
from perspective_jax.config.param_layout import map_routed_ffns

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")
_EPS = 1e-8


GRANULARITIES = ("tensor", "row")


def absmean_scale(w: jax.Array, granularity: str = "tensor") -> jax.Array:
    """mean|W| of [..., K, N] keepdims: over K and N (tensor) or over K (row)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    axes = (-2, -1) if granularity == "tensor" else (-2,)
    return jnp.mean(jnp.abs(w), axis=axes, keepdims=True)


def ternary_codes(w: jax.Array, granularity: str = "tensor") -> tuple[jax.Array, jax.Array]:
    """(trits in {−1, 0, +1} as float, scale keepdims) with W_t = trits · scale."""
    scale = absmean_scale(w, granularity)
    return jnp.clip(jnp.round(w / (scale + _EPS)), -1, 1), scale


def ternarize(w: jax.Array, granularity: str = "tensor") -> jax.Array:
    """The ternary value W_t (no gradient trick)."""
    trits, scale = ternary_codes(w, granularity)
    return trits * scale


def magnitude_threshold(a: jax.Array, fraction) -> jax.Array:
    """Per row of a [..., n] (non-negative float32), the value t with
    `a >= t` ⇔ `a >= jnp.quantile(a, 1 − fraction)` (linear interpolation): the
    k-th largest entry, k = n − ⌈(n−1)(1 − fraction)⌉, found by bisection on the
    float32 bit pattern (31 counting passes instead of a sort per matrix, which
    cost most of a ternary training step on CPU). Returns [..., 1]."""
    n = a.shape[-1]
    q = 1.0 - jnp.asarray(fraction, jnp.float32)
    k = n - jnp.ceil((n - 1) * q).astype(jnp.int32)                # entries to keep
    bits = jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.int32)

    def step(i, lo):                         # lo: largest pattern with count(≥ lo) ≥ k
        cand = lo | (1 << (30 - i))
        enough = jnp.sum(bits >= cand[..., None], axis=-1) >= k
        return jnp.where(enough, cand, lo)
    lo = jax.lax.fori_loop(0, 31, step, jnp.zeros(a.shape[:-1], jnp.int32))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)[..., None]


def ternary_ste(w: jax.Array, fraction=1.0, granularity: str = "tensor") -> jax.Array:
    """W with its `fraction` largest-magnitude entries (per matrix) replaced by
    their ternary values; gradient is the identity (straight-through)."""
    wt = ternarize(w, granularity)
    fraction = jnp.asarray(fraction, jnp.float32)
    flat = jax.lax.stop_gradient(jnp.abs(w)).reshape(*w.shape[:-2], -1)
    threshold = magnitude_threshold(flat, fraction)[..., None]
    mask = (jnp.abs(w) >= threshold) & (fraction > 0)
    mixed = jnp.where(mask, wt, w)
    return w + jax.lax.stop_gradient(mixed - w)


def schedule_fraction(schedule: tuple[float, ...], step, total_steps: int):
    """Fraction ternarised at `step` of a stage of `total_steps` (equal phases)."""
    table = jnp.asarray(schedule, jnp.float32)
    phase = jnp.minimum((step * len(schedule)) // max(total_steps, 1), len(schedule) - 1)
    return table[phase]


def quantize_experts(params: dict, cfg: ModelConfig, fraction=1.0,
                     granularity: str = "tensor") -> dict:
    """Apply `ternary_ste` to every routed expert matrix of a parameter tree."""
    def quantize(_, ffn):
        for name in EXPERT_WEIGHTS:
            ffn[name] = ternary_ste(ffn[name], fraction, granularity)
        return ffn
    return map_routed_ffns(params, cfg, quantize)


def quantize_activations_int8(x: jax.Array) -> jax.Array:
    """Per-token absmax 8-bit fake quantisation with STE: x ≈ round(x·127/max|x|)·max|x|/127."""
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0 + _EPS
    q = jnp.clip(jnp.round(x / scale), -127, 127) * scale
    return x + jax.lax.stop_gradient(q - x)
