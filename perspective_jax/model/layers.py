"""Building blocks shared by every layer: projections, RMSNorm, SwiGLU.

Parameters carry logical axis names (`nn.with_logical_partitioning`) so the
trainer can map them to mesh axes with one rule table
(`perspective_jax.train.sharding`).
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from perspective_jax.config import ModelConfig
from perspective_jax.config.choices import BATCH_AXES
from perspective_jax.quant.quantized_kernel import QuantizedKernel


def dtype_of(name: str):
    return jnp.dtype(name)


def logical(init, axes: Sequence[str]):
    return nn.with_logical_partitioning(init, tuple(axes))


def quantized_param(module: nn.Module, name: str = "kernel"):
    """The module's param `name` if the params hold a `QuantizedKernel` there, else
    None (read before `self.param`, whose shape check expects a float array)."""
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if isinstance(value, QuantizedKernel):
            return value
    return None


def flat_dot(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
    """x [..., *in] · w [*in, *out] → [..., *out], contracting the trailing `n_in` axes
    of x with the leading `n_in` of w, as ONE 2-D matmul [N, Π in] × [Π in, Π out].

    Every projection goes through here: XLA:CPU lowers a dot of 3-D activations
    ([B, T, d]) with a physical transpose in the weight-gradient dots, which
    flattening the batch axes first removes (a TinyShakespeare step 226 → 163 ms,
    docs/benchmarks.md); values and gradients are those of `jnp.tensordot`."""
    lead, in_shape = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:]
    if tuple(w.shape[:n_in]) != tuple(in_shape):
        raise ValueError(f"cannot contract input axes {tuple(in_shape)} with a weight "
                         f"of shape {tuple(w.shape)}")
    out_shape = w.shape[n_in:]
    k = math.prod(in_shape)
    y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1))
    return y.reshape(*lead, *out_shape)


class Projection(nn.Module):
    """y = x @ W over the last axis of x; W: [in, *features] (no bias), or a
    `QuantizedKernel` of that shape (a GPTQ export at inference)."""

    features: tuple[int, ...]
    axes: tuple[str, ...]  # logical names: input axis, then one per feature axis
    cfg: ModelConfig
    init_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "normal",
                                                in_axis=0, out_axis=tuple(range(1, 1 + len(self.features))))
        dt = dtype_of(self.cfg.dtype)
        quantized = quantized_param(self)
        if quantized is not None:
            return quantized.contract(x.astype(dt), 1).astype(dt)
        kernel = self.param("kernel", logical(init, self.axes),
                            (x.shape[-1], *self.features), dtype_of(self.cfg.param_dtype))
        return flat_dot(x.astype(dt), kernel.astype(dt))


class OutProjection(nn.Module):
    """y = Σ_{in axes} x · W, contracting the trailing `len(in_shape)` axes of x."""

    features: int
    axes: tuple[str, ...]
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, n_in: int) -> jax.Array:
        in_shape = x.shape[-n_in:]
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal",
                                                in_axis=tuple(range(n_in)), out_axis=n_in)
        dt = dtype_of(self.cfg.dtype)
        quantized = quantized_param(self)
        if quantized is not None:
            return quantized.contract(x.astype(dt), n_in).astype(dt)
        kernel = self.param("kernel", logical(init, self.axes),
                            (*in_shape, self.features), dtype_of(self.cfg.param_dtype))
        return flat_dot(x.astype(dt), kernel.astype(dt), n_in)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · scale   (learnable scale, no bias; float32)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", logical(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), dtype_of(self.cfg.param_dtype))
        x32 = x.astype(jnp.float32)
        inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return (x32 * inv * scale.astype(jnp.float32)).astype(dtype_of(self.cfg.dtype))


class SwiGLU(nn.Module):
    """FFN(x) = W_down (silu(W_gate x) ⊙ W_up x); x: [..., d] → [..., d]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        gate = Projection((cfg.d_ff,), ("embed", "mlp"), cfg, name="w_gate")(x)
        up = Projection((cfg.d_ff,), ("embed", "mlp"), cfg, name="w_up")(x)
        return Projection((cfg.d_model,), ("mlp", "embed"), cfg, name="w_down")(
            nn.silu(gate) * up)


def constrain_batch(x: jax.Array) -> jax.Array:
    """Pin a [B, T, D] residual stream to the batch axes of the ambient mesh (the
    trainer's `jax.set_mesh`): without it XLA may spread D over `fsdp` and gather the
    whole batch on every device (measured ~20× the step memory at 1,024 devices).
    A no-op without a mesh (inference), or when B does not divide evenly."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    if x.shape[0] % math.prod(mesh.shape[a] for a in BATCH_AXES):
        return x
    spec = jax.sharding.PartitionSpec(BATCH_AXES, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, spec)
