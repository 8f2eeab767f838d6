"""Forward-mode derivatives on the streaming engine: the loss of whole windows and its
directional derivatives along K tangents of the LoRA adapters, carried layer by layer
while the experts stream (SPEC §3.8).

    loss, d = window_loss_and_tangents(engine, windows, adapters, tangents, scale)

windows [B, T+1] int (inputs windows[:, :-1], targets windows[:, 1:]); `adapters` the
LoRA tree of `model.extensions.init_lora`; `tangents` the same tree with a leading
axis of K directions. Returns the mean next-token cross-entropy L (float) and
d [K] = ∇L · v_k for each direction, what `adapt.forward_grad` turns into ĝ.

The walk is the engine's own (`StreamingEngine._forward_chunk`): embed, for every
layer the block's "mix" part (with the layer's adapter), then its routed experts
(brought in through the engine's tiers, one expert at a time) or its dense FFN; the
head (HEAD_ROWS tokens at a time, so the K tangent logits are never whole). Each part
is one jitted forward-mode call where it runs (`jax.jvp` vmapped over the K tangents;
the primal, which does not depend on them, is computed once), so only one layer's
values are alive at a time: no activations are stored for a backward
pass, and the device holds the engine's slots, x [B, T, d] and the K tangents
[K, B, T, d]. Routing is piecewise constant: the expert chosen for a row has no
derivative (its gate does), as in the in-memory model. Whole windows run from an
empty state (no cache): what `PerspectiveLM` computes on them in training mode.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.errors import UserError
from perspective_jax.infer import compute as L
from perspective_jax.model.extensions import NEAREST


def next_token_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy (nats, float32) of logits [N, V] for targets [N]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[:, None], -1))


HEAD_ROWS = 32             # tokens per head pass: K tangent logits [K, 32, V] at a time


@functools.partial(jax.jit, static_argnums=(0,))
def _head_loss(cfg, final_norm, table, x, tx, targets):
    """(Σ cross-entropy of x [N, d]'s logits for targets [N], its K directional
    derivatives [K]) along tx [K, N, d]: the head and the loss in forward mode."""
    def total(x_):
        logits = L.head(cfg, final_norm, table, x_)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return -jnp.sum(jnp.take_along_axis(logp, targets[:, None], -1))
    values, d = jax.vmap(lambda t: jax.jvp(total, (x,), (t,)))(tx)
    return values[0], d


def _layer_slice(tree: Optional[dict], p: int, i: int, axis: int) -> Optional[dict]:
    """Layer i of period p of a LoRA tree (period axis `axis` sliced off), or None."""
    if tree is None:
        return None
    layer = tree["periods"].get(f"layer_{i}")
    return None if layer is None else jax.tree.map(lambda a: a.take(p, axis=axis), layer)


def _jvps(fn, primals: tuple, tangents: tuple):
    """(fn(*primals), its K tangent outputs): jvp vmapped over the tangents' leading
    axis (the primal does not depend on them, so it is computed once)."""
    out, t_out = jax.vmap(lambda *t: jax.jvp(fn, primals, t))(*tangents)
    return jax.tree.map(lambda o: o[0], out), t_out


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _mix(cfg, kind: str, scale: float, lp, x, segment_pos, a, tx, ta):
    """The block's "mix" part with the layer's adapter (or None) and K tangents."""
    if a is None:
        return _jvps(lambda x_: L.mixer(cfg, kind, scale, lp, x_, segment_pos, None)[0],
                     (x,), (tx,))
    return _jvps(lambda x_, a_: L.mixer(cfg, kind, scale, lp, x_, segment_pos, None, a_)[0],
                 (x, a), (tx, ta))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _dense(cfg, kind: str, lp, h, th):
    return _jvps(lambda h_: L.dense_ffn(cfg, kind, lp, h_), (h,), (th,))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _route(cfg, moe, layer: int, lp, h, th, segment_pos, period):
    """(expert [B, T], (hn, gate), their K tangents) of the router on h."""
    idx = L.route(cfg, moe, NEAREST, layer, lp, h, segment_pos, period)[1]
    out, t_out = _jvps(lambda h_: (lambda r: (r[0], r[2]))(
        L.route(cfg, moe, NEAREST, layer, lp, h_, segment_pos, period)), (h,), (th,))
    return idx, out, t_out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _expert(cfg, bits: int, codes, scales, j, e, x, tx):
    return _jvps(lambda x_: L.expert_out(cfg, bits, x_, codes, scales, j, e), (x,), (tx,))


@functools.partial(jax.jit, static_argnums=(0,))
def _combine(cfg, h, y, gate, th, ty, tgate):
    return _jvps(lambda h_, y_, g_: L.combine(cfg, h_, y_, g_), (h, y, gate), (th, ty, tgate))


def _routed(engine, j: int, lp, h, th, segment_pos, p: int, i: int):
    """Expert layer j: h + gate · expert(RMSNorm(h)) and its K tangents; each expert
    the rows need is brought in once (rows padded to a power of two, as the engine's
    prefill does, so the compiled shapes are few)."""
    cfg = engine.model
    idx, (hn, gate), (thn, tgate) = _route(cfg, engine.moe, i, lp, h, th, segment_pos,
                                           np.int32(p))
    idx = np.asarray(idx).reshape(-1)
    n, d, k = idx.size, cfg.d_model, th.shape[0]
    hn_flat, thn_flat = hn.reshape(n, d), thn.reshape(k, n, d)
    y, ty = jnp.zeros((n, d), hn.dtype), jnp.zeros((k, n, d), thn.dtype)
    for e in np.unique(idx):
        slot = engine.tiers.ensure((j, int(e)))
        rows = np.flatnonzero(idx == e)
        padded = np.full(1 << max(len(rows) - 1, 0).bit_length(), rows[0], np.int32)
        padded[: len(rows)] = rows
        take = jnp.asarray(padded)
        out, t_out = _expert(cfg, engine.activation_bits, engine.slots.arrays[slot],
                             engine.expert_scales, np.int32(j), np.int32(e),
                             hn_flat[take], thn_flat[:, take])
        engine.slots.fence(slot, out[0, 0])
        y, ty = y.at[take].set(out), ty.at[:, take].set(t_out)
    return _combine(cfg, h, y, gate, th, ty, tgate)


def window_loss_and_tangents(engine, windows, adapters: Optional[dict], tangents,
                             scale: float = 1.0, layer_params=None,
                             on_layer: Optional[Callable[[], None]] = None):
    """(mean next-token loss of `windows` [B, T+1], d [K]) on the streamed model with
    LoRA `adapters` (module docstring). `layer_params` ([p][i] trees, default the
    engine's) lets a caller route with other expert coordinates; `on_layer()` is
    called after each layer and after the head (tools measure live memory there)."""
    on_layer = on_layer or (lambda: None)
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise UserError(f"adaptation windows must be [B, T+1] with T >= 1; got "
                        f"{windows.shape}")
    if windows.min() < 0 or windows.max() >= engine.model.vocab_size:
        raise UserError(f"token ids must lie in [0, {engine.model.vocab_size})")
    k = jax.tree.leaves(tangents)[0].shape[0]
    cfg = engine.model
    layer_params = engine.layer_params if layer_params is None else layer_params
    tokens, targets = jnp.asarray(windows[:, :-1]), jnp.asarray(windows[:, 1:])
    b, t = tokens.shape
    segment_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    x = L.embed(cfg, engine.embed_table, tokens)
    tx = jnp.zeros((k, *x.shape), x.dtype)
    for p in range(cfg.n_periods):
        for i, kind in enumerate(cfg.layer_pattern):
            lp = layer_params[p][i]
            a, ta = _layer_slice(adapters, p, i, 0), _layer_slice(tangents, p, i, 1)
            h, th = _mix(cfg, kind, scale, lp, x, segment_pos, a, tx, ta)
            if engine.routed and kind == "pdr":
                x, tx = _routed(engine, engine.layer_index[(p, i)], lp, h, th, segment_pos,
                                p, i)
            else:
                x, tx = _dense(cfg, kind, lp, h, th)
            on_layer()
    x, tx = x.reshape(b * t, -1), tx.reshape(k, b * t, -1)
    targets = targets.reshape(-1)
    loss, d = 0.0, 0.0
    for s in range(0, b * t, HEAD_ROWS):
        part, dpart = _head_loss(cfg, engine.final_norm, engine.embed_table,
                                 x[s: s + HEAD_ROWS], tx[:, s: s + HEAD_ROWS],
                                 targets[s: s + HEAD_ROWS])
        loss, d = loss + part, d + dpart
        on_layer()
    loss, d = loss / (b * t), d / (b * t)
    return float(loss), np.asarray(d)
