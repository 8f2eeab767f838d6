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
head. Each part is linearised where it runs (`jax.linearize`: one primal pass,
then the K tangents through the linear map, `jax.vmap`-batched), so only one
layer's residuals are alive at a time: no activations are stored for a backward
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


def _linear(fn, primals: tuple, tangents: tuple):
    """(fn(*primals), the K tangent outputs): one linearisation, tangents vmapped."""
    out, lin = jax.linearize(fn, *primals)
    return out, jax.vmap(lin)(*tangents)


def _routed(engine, j: int, lp, h, th, segment_pos, p: int, i: int):
    """Expert layer j: h + gate · expert(RMSNorm(h)) and its K tangents."""
    cfg = engine.model
    route = lambda h_: L.route(cfg, engine.moe, NEAREST, i, lp, h_, segment_pos, np.int32(p))
    idx = np.asarray(route(h)[1]).reshape(-1)
    (hn, gate), (thn, tgate) = _linear(lambda h_: (lambda r: (r[0], r[2]))(route(h_)),
                                       (h,), (th,))
    n, d = idx.size, cfg.d_model
    hn_flat, thn_flat = hn.reshape(n, d), thn.reshape(thn.shape[0], n, d)
    y, ty = jnp.zeros((n, d), hn.dtype), jnp.zeros((thn.shape[0], n, d), thn.dtype)
    for e in np.unique(idx):
        slot = engine.tiers.ensure((j, int(e)))
        rows = jnp.asarray(np.flatnonzero(idx == e))
        codes = engine.slots.arrays[slot]
        out, t_out = _linear(
            lambda x_: L.expert_out(cfg, engine.activation_bits, x_, codes,
                                    engine.expert_scales, np.int32(j), np.int32(e)),
            (hn_flat[rows],), (thn_flat[:, rows],))
        engine.slots.fence(slot, out[0, 0])
        y, ty = y.at[rows].set(out), ty.at[:, rows].set(t_out)
    return _linear(lambda h_, y_, g_: L.combine(cfg, h_, y_, g_), (h, y, gate), (th, ty, tgate))


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
            if a is None:
                h, th = _linear(lambda x_: L.mixer(cfg, kind, scale, lp, x_, segment_pos,
                                                   None)[0], (x,), (tx,))
            else:
                h, th = _linear(lambda x_, a_: L.mixer(cfg, kind, scale, lp, x_, segment_pos,
                                                       None, a_)[0], (x, a), (tx, ta))
            if engine.routed and kind == "pdr":
                x, tx = _routed(engine, engine.layer_index[(p, i)], lp, h, th, segment_pos,
                                p, i)
            else:
                x, tx = _linear(lambda h_: L.dense_ffn(cfg, kind, lp, h_), (h,), (th,))
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
