"""Extension points of the forward pass, honoured identically by `PerspectiveLM` and
the streaming engine (SPEC §3.6–3.9 attach here):

    ext = Extensions(route=RoutePolicy("antipode"),          # routing perspective (MPD)
                     final_transform=project, final_state=poly,  # RMSNorm(x) → x̂ before the head (SPP)
                     inject_layer=5, inject=vec,              # x += vec after layer 5 (HDM)
                     adapters=lora)                           # low-rank W_p updates (FMEA)
    logits, cache = model.apply({"params": p}, tokens, cache=cache, ext=ext)

* `route`: which expert each routed layer uses — nearest (the trained model), the
  k-th nearest, the expert nearest the antipode of z, or a seeded random expert,
  drawn per (seed, period, layer, position) so a token-by-token decode and a
  parallel pass draw the same experts. `RowRoutes((p0, p1, …))` routes row b of
  the batch by policy b mod n: several perspectives as one batch (MPD, SPEC §3.6).
* `final_transform(xn, final_state) → (xn', info)`, xn = RMSNorm(x) [B, T, d] float32:
  the head computes logits = xn' · Eᵀ after it; `final_state` (traced arrays, e.g. the
  safety polytope and which of its rows are on) is passed through; `info` is a dict of
  [B, T] arrays (e.g. whether the projection moved the state), sown by `PerspectiveLM`
  into the "intermediates" collection as "final_info" and kept by the engine.
* `inject_layer` l (global index p·len(layer_pattern) + i) and `inject` ([d], [B, d]
  or [B, T, d]): after layer l's block the residual stream becomes x + inject.
* `adapters`: LoRA tree {"periods": {"layer_i": {"w_p": {"a": [P, d_in, r],
  "b": [P, r, d_out]}}}}; a PDR projection with an adapter computes
  x·W + adapter_scale · (x·A)·B (`lora_delta`). B = 0 leaves the model unchanged.

Static fields (the policy, the transform, the layer, the scale) are part of the
pytree's structure, so a jitted caller recompiles when they change; the arrays
(`final_state`, `inject`, `adapters`) are traced.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import flax.struct
import jax
import jax.numpy as jnp

from perspective_jax.config import ModelConfig
from perspective_jax.config.choices import ROUTE_MODES
from perspective_jax.errors import UserError
from perspective_jax.model.layers import flat_dot


@dataclasses.dataclass(frozen=True)
class RoutePolicy:
    """How a routed layer picks its expert: `mode` in ROUTE_MODES; `k` for "kth"
    (1 = second nearest); `seed` for "random"."""

    mode: str = "nearest"
    k: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.mode not in ROUTE_MODES:
            raise UserError(f"route mode {self.mode!r}: use one of {ROUTE_MODES}")
        if self.k < 0:
            raise UserError(f"route k={self.k}: must be >= 0")


NEAREST = RoutePolicy()


@dataclasses.dataclass(frozen=True)
class RowRoutes:
    """Row b of the batch is routed by `policies[b % len(policies)]`, so n routing
    views of the same model (MPD's perspectives) run as one batch."""

    policies: tuple

    def __post_init__(self):
        object.__setattr__(self, "policies", tuple(self.policies))
        if not self.policies or not all(isinstance(p, RoutePolicy) for p in self.policies):
            raise UserError("RowRoutes needs one or more RoutePolicy entries")


Route = Union[RoutePolicy, RowRoutes]


@flax.struct.dataclass
class Extensions:
    """What a call adds to the plain forward pass (module docstring)."""

    route: Route = flax.struct.field(pytree_node=False, default=NEAREST)
    final_transform: Optional[Callable] = flax.struct.field(pytree_node=False, default=None)
    inject_layer: Optional[int] = flax.struct.field(pytree_node=False, default=None)
    adapter_scale: float = flax.struct.field(pytree_node=False, default=1.0)
    final_state: Any = None
    inject: Optional[jax.Array] = None
    adapters: Optional[dict] = None

    def __post_init__(self):
        if (self.inject_layer is None) != (self.inject is None):
            raise UserError("residual injection needs both inject_layer and inject")


NONE = Extensions()


def check_extensions(ext: Extensions, cfg: ModelConfig) -> None:
    """One-line errors for extensions that do not fit the model."""
    n_layers = cfg.n_periods * len(cfg.layer_pattern)
    if ext.inject_layer is not None and not 0 <= ext.inject_layer < n_layers:
        raise UserError(f"inject_layer {ext.inject_layer}: the model has layers "
                        f"0..{n_layers - 1}")


def layer_adapters(ext: Optional[Extensions], p: int, i: int) -> Optional[dict]:
    """Layer i of period p's adapter subtree (period axis sliced off), or None."""
    if ext is None or ext.adapters is None:
        return None
    layer = ext.adapters["periods"].get(f"layer_{i}")
    return None if layer is None else jax.tree.map(lambda a: a[p], layer)


def lora_delta(x: jax.Array, adapter: Optional[dict], scale: float):
    """scale · (x·A)·B for x [..., d_in], A [d_in, r], B [r, d_out] (float32), or None."""
    if adapter is None:
        return None
    x = x.astype(jnp.float32)
    return scale * flat_dot(flat_dot(x, adapter["a"].astype(jnp.float32)),
                            adapter["b"].astype(jnp.float32))


def inject_vector(ext: Extensions, x: jax.Array) -> jax.Array:
    """The injection broadcast to x [B, T, d]."""
    v = jnp.asarray(ext.inject, x.dtype)
    if v.ndim == 2:
        v = v[:, None, :]
    return jnp.broadcast_to(v, x.shape)


def inject_after(x: jax.Array, ext: Optional[Extensions], layer_index: int) -> jax.Array:
    """x + inject when `layer_index` is the injection layer (static index: the engine)."""
    if ext is None or ext.inject_layer != layer_index:
        return x
    return x + inject_vector(ext, x)


def final_hidden(xn: jax.Array, ext: Optional[Extensions]) -> tuple[jax.Array, dict]:
    """(the final transform applied to RMSNorm(x) before the tied head, its info)."""
    if ext is None or ext.final_transform is None:
        return xn, {}
    out, info = ext.final_transform(xn, ext.final_state)
    if out.shape != xn.shape:
        raise UserError(f"final_transform returned shape {out.shape} for {xn.shape}")
    return out, dict(info)


def init_lora(cfg: ModelConfig, rng: jax.Array, rank: int = 4, targets=("w_p",),
              init_scale: float = 0.01) -> dict:
    """Rank-`rank` adapters on `targets` of every PDR layer: A ~ N(0, init_scale²),
    B = 0, so a fresh adapter changes nothing (SPEC §3.8: rank 4 on W_p)."""
    out_dims = {"w_p": cfg.d_model, "w_v": cfg.d_model, "w_k": cfg.pdr_rank,
                "w_q": cfg.pdr_rank, "w_o": cfg.d_model}
    in_dims = {"w_o": cfg.d_model}
    periods = {}
    for i, kind in enumerate(cfg.layer_pattern):
        if kind != "pdr":
            continue
        layer = {}
        for name in targets:
            if name not in out_dims:
                raise UserError(f"LoRA target {name!r}: use some of {tuple(out_dims)}")
            rng, sub = jax.random.split(rng)
            d_in = in_dims.get(name, cfg.d_model)
            layer[name] = {"a": init_scale * jax.random.normal(
                               sub, (cfg.n_periods, d_in, rank), jnp.float32),
                           "b": jnp.zeros((cfg.n_periods, rank, out_dims[name]), jnp.float32)}
        periods[f"layer_{i}"] = layer
    return {"periods": periods}
