"""The model's training objective and evaluation statistics, per model kind.

Dense: token NLL only. Routed (`model.routed`): NLL + α·balance + β·delta +
γ·smoothness + λ·locality (SPEC §3.3; `model.expert_sharing`,
`routed_ffn.locality_loss`), with routing statistics collected from the "aux"
collection the routed FFNs sow into.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from perspective_jax.config import PerspectiveConfig
from perspective_jax.model.transformer import PerspectiveLM
from perspective_jax.model.expert_sharing import delta_loss
from perspective_jax.quant.ternary import quantize_experts, schedule_fraction


def stack_aux(aux) -> dict:
    """{'balance': [L], 'counts': [L, E], ...} over every routed layer and period."""
    out: dict = {}
    for path, value in jax.tree_util.tree_flatten_with_path(aux)[0]:
        keys = [getattr(p, "key", None) for p in path]
        name = [k for k in keys if isinstance(k, str)][-1]
        out.setdefault(name, []).append(value)
    return {k: jnp.concatenate(v, axis=0) for k, v in out.items()}


def schedule_steps(cfg: PerspectiveConfig) -> int:
    """Steps the progressive ternary schedule spans: `ternary.schedule_steps`
    (pinned at the stage's first start), else `train.steps`."""
    return cfg.ternary.schedule_steps or cfg.train.steps


def effective_params(cfg: PerspectiveConfig, params, step):
    """The weights the model computes with: ternary experts (at the schedule's
    fraction for this step of the stage) when `ternary.enabled`."""
    if not cfg.ternary.enabled:
        return params
    fraction = schedule_fraction(cfg.ternary.schedule, step, schedule_steps(cfg))
    return quantize_experts(params, cfg.model, fraction, cfg.ternary.scale_granularity)


def expert_activation_bits(cfg: PerspectiveConfig) -> int:
    """Bits of the expert activations the model computes with (0 = float)."""
    return cfg.ternary.activation_bits if cfg.ternary.enabled else 0


def kl_divergence(p_logits, q_logits):
    """Mean over tokens of KL(p ‖ q) = Σ p (log p − log q), float32."""
    logp = jax.nn.log_softmax(p_logits.astype(jnp.float32), -1)
    logq = jax.nn.log_softmax(q_logits.astype(jnp.float32), -1)
    return jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logq), -1))


def make_apply_fns(cfg: PerspectiveConfig):
    """(train_apply, eval_apply) for the step functions of `train.step`.

    train_apply(params, inputs, context) -> (logits, aux_loss, scalar metrics)
    eval_apply(params, inputs)           -> (logits, summable routing statistics)
    With `ternary.enabled`, experts are ternarised (STE, progressive schedule) and
    the loss adds kd_weight · KL(student ‖ teacher) against context["teacher"].
    """
    model = PerspectiveLM(cfg.model, cfg.moe, activation_bits=expert_activation_bits(cfg))
    teacher_model = PerspectiveLM(cfg.model, cfg.moe)
    moe = cfg.moe

    def distill(params, inputs, context, logits):
        if not cfg.ternary.enabled or "teacher" not in context:
            return jnp.float32(0.0), {}
        teacher, _ = teacher_model.apply({"params": context["teacher"]}, inputs)
        kl = kl_divergence(logits, jax.lax.stop_gradient(teacher))
        fraction = schedule_fraction(cfg.ternary.schedule, context["step"], schedule_steps(cfg))
        return cfg.ternary.kd_weight * kl, {"kd_loss": kl, "ternary_fraction": fraction}

    if not cfg.model.routed:
        def train_apply(params, inputs, context):
            logits = model.apply({"params": params}, inputs)[0]
            return logits, jnp.float32(0.0), {}

        def eval_apply(params, inputs):
            return model.apply({"params": params}, inputs)[0], {}
        return train_apply, eval_apply

    def routed(params, inputs):
        (logits, _), state = model.apply({"params": params}, inputs, mutable=["aux"])
        return logits, stack_aux(state["aux"])

    def train_apply(params, inputs, context):
        logits, stats = routed(effective_params(cfg, params, context["step"]), inputs)
        balance, smooth = stats["balance"].mean(), stats["smooth"].mean()
        local = stats["local"].mean()
        delta = delta_loss(params, cfg.model, moe, cfg.ternary.scale_granularity)
        aux_loss = (moe.balance_weight * balance + moe.delta_weight * delta
                    + moe.smoothness_weight * smooth + moe.locality_weight * local)
        kd, kd_metrics = distill(params, inputs, context, logits)
        return logits, aux_loss + kd, {"balance_loss": balance, "delta_loss": delta,
                                       "smoothness_loss": smooth, "locality_loss": local,
                                       **kd_metrics}

    def eval_apply(params, inputs):
        logits, stats = routed(params, inputs)
        return logits, {"counts": stats["counts"], "switches": stats["switches"].sum(0),
                        "entropy": stats["entropy"].mean()}

    return train_apply, eval_apply
