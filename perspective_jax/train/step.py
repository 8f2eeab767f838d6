"""Optimizer, train state, and the jitted train / eval steps.

State is a plain dict pytree {"step", "params", "opt_state"} (what orbax saves).
The train step accumulates gradients over the leading `grad_accum` axis of the
batch with `lax.scan`, then applies AdamW (warmup + cosine, global-norm clip,
decoupled weight decay, below). A non-finite loss or gradient skips
the update (state unchanged except `step`) and reports `finite = False`.

Weight decay (decoupled, λ = train.weight_decay: p ← p − lr·λ·p) applies to every
parameter except those named in NO_DECAY: norm scales (`scale`, neutral at 1, not
0) and the PDR decay bias (`b_p`: sigmoid(b_p) is the initial decay, 0 would mean ½). It does apply to the router:
`w_route`, `offsets` (pulled toward 0, i.e. each expert toward its lattice cell,
which keeps neighbours on the lattice for delta streaming; align resets them to 0
anyway) and `log_temperature` (pulled toward 0, i.e. τ toward 1, the default
`moe.router_temperature`). Both pulls are lr·λ per step, weak next to the task
gradient; they are kept so routed-stage losses stay as they were.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from perspective_jax.config import TrainConfig

NO_DECAY = ("scale", "b_p")  # norm scales and the decay bias are not weight-decayed


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio)


def _decay_mask(params):
    def keep(path, _):
        return not any(getattr(p, "key", None) in NO_DECAY for p in path)
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(lr_schedule(cfg), b1=0.9, b2=0.95, eps=1e-8,
                             weight_decay=cfg.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)


def init_state(params, tx: optax.GradientTransformation) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": tx.init(params)}


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood in float32. logits [B,T,V], targets [B,T]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def frozen_context(state: dict) -> dict:
    """What apply functions may read besides params: the step and frozen extras
    (e.g. a distillation teacher), never trained."""
    return {k: v for k, v in state.items() if k not in ("params", "opt_state")}


def make_train_step(apply_fn: Callable, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, ce_weight: float = 1.0) -> Callable:
    """apply_fn(params, inputs [B,T], context) -> (logits, aux_loss, scalar metrics).
    Returns step(state, batch) -> (state, metrics), batch [accum, micro, T+1] int32.
    The optimised loss is ce_weight · mean token NLL + aux_loss; `loss` reports the NLL."""

    def loss_fn(params, window, context):
        logits, aux_loss, aux = apply_fn(params, window[:, :-1], context)
        nll = jnp.mean(token_nll(logits, window[:, 1:]))
        return ce_weight * nll + aux_loss, (nll, aux)

    def step(state, batch):
        params = state["params"]
        context = frozen_context(state)

        def micro(acc, window):
            (_, (nll, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, window, context)
            return jax.tree.map(jnp.add, acc, (nll, aux, grads)), None

        _, (_, aux_shape) = jax.eval_shape(loss_fn, params, batch[0], context)
        zeros = (jnp.zeros((), jnp.float32),
                 jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape),
                 jax.tree.map(jnp.zeros_like, params))
        (loss, aux, grads), _ = jax.lax.scan(micro, zeros, batch)
        n = batch.shape[0]
        loss, aux, grads = loss / n, jax.tree.map(lambda a: a / n, aux), \
            jax.tree.map(lambda g: g / n, grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = {**state, "step": state["step"] + 1, "params": keep(new_params, params),
                     "opt_state": keep(opt_state, state["opt_state"])}
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite,
                   "lr": schedule(state["step"]), **aux}
        return new_state, metrics

    return step


def make_eval_step(stats_fn: Callable) -> Callable:
    """stats_fn(params, inputs) -> (logits, dict of summable arrays); params are
    the ones the model uses (already quantised where that applies).
    eval(params, windows [B, T+1]) -> (sum of token NLL, token count, stats)."""

    def evaluate(params, windows):
        logits, stats = stats_fn(params, windows[:, :-1])
        nll = token_nll(logits, windows[:, 1:])
        return jnp.sum(nll), jnp.float32(nll.size), stats

    return evaluate
