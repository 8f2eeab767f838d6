"""The delta loss: lattice-neighbour experts should share their ternary codes (SPEC §3.3).

For every routed layer, matrix m ∈ {gate, up, down} and unordered lattice-neighbour
pair (a, b), with codes c = W / s (s = mean|W| per matrix or per output feature,
`quant.ternary.absmean_scale`):

    float:    mean |W_a − W_b|                                   (the first form)
    ternary:  mean |ĉ_a − ĉ_b|,  ĉ = c + sg(round_clip(c) − c),  s held (sg)

and the loss is the mean over layers × matrices. The ternary form's value is the mean
trit difference of the pair (1 per 0↔±1 change, 2 per −1↔+1): exactly what a byte
delta between their exported regions has to carry. Its gradient (straight through
the rounding) moves every weight whose trit differs toward the neighbour's trit by
1/s, and leaves agreeing trits alone; the float form instead pulls all weights
together, mostly ones whose trits already agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from perspective_jax.config import ModelConfig, MoEConfig
from perspective_jax.config.param_layout import routed_ffns
from perspective_jax.moe import torus
from perspective_jax.quant.ternary import EXPERT_WEIGHTS, absmean_scale

_EPS = 1e-8


def ste_codes(w, granularity: str = "tensor"):
    """Ternary codes of w [..., K, N] with the rounding passed straight through and
    the scale held: value round_clip(w / s), gradient 1 / s."""
    c = w / (jax.lax.stop_gradient(absmean_scale(w, granularity)) + _EPS)
    return c + jax.lax.stop_gradient(jnp.clip(jnp.round(c), -1, 1) - c)


def abs_zero_grad(d):
    """|d| whose gradient at d = 0 is 0 (jnp.abs has 1 there, which would push every
    agreeing pair of trits one way): d · sg(sign d)."""
    return d * jax.lax.stop_gradient(jnp.sign(d))


def delta_loss(params, cfg: ModelConfig, moe: MoEConfig,
               granularity: str = "tensor") -> jax.Array:
    """Mean distance between lattice-neighbour experts, in `moe.delta_form` (module
    docstring); `granularity` = ternary.scale_granularity (ternary form only)."""
    pairs = jnp.asarray(torus.neighbour_pairs(moe.lattice))
    if pairs.shape[0] == 0:
        return jnp.zeros((), jnp.float32)
    total, count = 0.0, 0
    for _, ffn in routed_ffns(params, cfg):
        for name in EXPERT_WEIGHTS:
            w = ffn[name]                                               # [P, E, K, N]
            if moe.delta_form == "ternary":
                w = ste_codes(w.astype(jnp.float32), granularity)
            total = total + abs_zero_grad(w[:, pairs[:, 0]] - w[:, pairs[:, 1]]).mean()
            count += 1
    return total / count
