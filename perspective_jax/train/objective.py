"""The model's training objective and evaluation statistics, per model kind.

Dense: token NLL only. Routed (`model.routed`): NLL + α·balance + β·delta +
γ·smoothness (SPEC §3.3), with routing statistics collected from the "aux"
collection the routed FFNs sow into.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from perspective_jax.config import PerspectiveConfig
from perspective_jax.model.transformer import PerspectiveLM
from perspective_jax.moe.routed_ffn import delta_loss


def stack_aux(aux) -> dict:
    """{'balance': [L], 'counts': [L, E], ...} over every routed layer and period."""
    out: dict = {}
    for path, value in jax.tree_util.tree_flatten_with_path(aux)[0]:
        keys = [getattr(p, "key", None) for p in path]
        name = [k for k in keys if isinstance(k, str)][-1]
        out.setdefault(name, []).append(value)
    return {k: jnp.concatenate(v, axis=0) for k, v in out.items()}


def make_apply_fns(cfg: PerspectiveConfig):
    """(train_apply, eval_apply) for the step functions of `train.step`.

    train_apply(params, inputs) -> (logits, aux_loss, scalar metrics)
    eval_apply(params, inputs)  -> (logits, summable routing statistics)
    """
    model = PerspectiveLM(cfg.model, cfg.moe)
    moe = cfg.moe

    if not cfg.model.routed:
        def train_apply(params, inputs):
            return model.apply({"params": params}, inputs)[0], jnp.float32(0.0), {}

        def eval_apply(params, inputs):
            return model.apply({"params": params}, inputs)[0], {}
        return train_apply, eval_apply

    def routed(params, inputs):
        (logits, _), state = model.apply({"params": params}, inputs, mutable=["aux"])
        return logits, stack_aux(state["aux"])

    def train_apply(params, inputs):
        logits, stats = routed(params, inputs)
        balance, smooth = stats["balance"].mean(), stats["smooth"].mean()
        delta = delta_loss(params, cfg.model, moe)
        aux_loss = (moe.balance_weight * balance + moe.delta_weight * delta
                    + moe.smoothness_weight * smooth)
        return logits, aux_loss, {"balance_loss": balance, "delta_loss": delta,
                                  "smoothness_loss": smooth}

    def eval_apply(params, inputs):
        logits, stats = routed(params, inputs)
        return logits, {"counts": stats["counts"], "switches": stats["switches"].sum(0),
                        "entropy": stats["entropy"].mean()}

    return train_apply, eval_apply
