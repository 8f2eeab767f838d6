"""The model's training objective and evaluation statistics, per model kind.

Dense: token NLL only. Routed (`model.routed`): NLL + α·balance + β·delta +
γ·smoothness + λ·locality (SPEC §3.3; `model.expert_sharing`,
`routed_ffn.locality_loss`) + π·(CE_layer + CE_token) (the expert-predictor heads,
`predictor_terms`; π = moe.predictor_weight), with routing statistics collected
from the "aux" collection the routed FFNs sow into.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from perspective_jax.config import PerspectiveConfig
from perspective_jax.config.param_layout import expert_layers, routed_ffns
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


def _sown(value):
    return value[0] if isinstance(value, tuple) else value


def predictor_terms(aux, cfg: PerspectiveConfig) -> dict:
    """The expert-predictor heads against the experts the model chose, from the "aux"
    collection of a routed forward pass (L expert layers j in execution order):

        CE_layer = mean_{j < L−1, b, t} −log softmax(a_j[b, t])[e_{j+1}[b, t]]
        CE_token = mean_{b, t < T−1}   −log softmax(n[b, t])[e_0[b, t+1]]

    a_j: layer j's head (logits over layer j+1's experts), n: the final state's head,
    e_j: layer j's chosen expert. Returns {"layer_loss", "token_loss" (scalars),
    "layer_right", "token_right" ([2]: right argmax guesses, guesses — summable)};
    with one expert layer CE_layer is 0 over 0 guesses, likewise CE_token for T = 1."""
    ffns = dict(routed_ffns(aux, cfg.model))
    layers = expert_layers(cfg.model)
    choice = [_sown(ffns[i]["choice"])[p] for p, i in layers]              # [B, T] each
    guess = [_sown(ffns[i]["next_logits"])[p] for p, i in layers[:-1]]     # [B, T, E]
    token = _sown(aux["next_token_logits"])[:, :-1]                         # [B, T-1, E]
    pairs = [(g, c) for g, c in zip(guess, choice[1:])]
    pairs_token = [(token, choice[0][:, 1:])]
    out = {}
    for name, group in (("layer", pairs), ("token", pairs_token)):
        nll, right, n = jnp.float32(0.0), jnp.float32(0.0), 0
        for logits, target in group:
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
            nll = nll - jnp.take_along_axis(logp, target[..., None], -1).sum()
            right = right + (jnp.argmax(logits, -1) == target).sum()
            n += target.size
        out[f"{name}_loss"] = nll / max(n, 1)
        out[f"{name}_right"] = jnp.stack([right, jnp.float32(n)])
    return out


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
        return logits, stack_aux(state["aux"]), predictor_terms(state["aux"], cfg)

    def predictor_loss(pred):
        if moe.predictor_weight == 0:
            return jnp.float32(0.0), {}
        return (moe.predictor_weight * (pred["layer_loss"] + pred["token_loss"]),
                {"predictor_layer_loss": pred["layer_loss"],
                 "predictor_token_loss": pred["token_loss"]})

    def train_apply(params, inputs, context):
        logits, stats, pred = routed(effective_params(cfg, params, context["step"]), inputs)
        balance, smooth = stats["balance"].mean(), stats["smooth"].mean()
        local = stats["local"].mean()
        delta = delta_loss(params, cfg.model, moe, cfg.ternary.scale_granularity)
        aux_loss = (moe.balance_weight * balance + moe.delta_weight * delta
                    + moe.smoothness_weight * smooth + moe.locality_weight * local)
        kd, kd_metrics = distill(params, inputs, context, logits)
        heads, head_metrics = predictor_loss(pred)
        return logits, aux_loss + kd + heads, {"balance_loss": balance, "delta_loss": delta,
                                               "smoothness_loss": smooth,
                                               "locality_loss": local, **kd_metrics,
                                               **head_metrics}

    def eval_apply(params, inputs):
        logits, stats, pred = routed(params, inputs)
        return logits, {"counts": stats["counts"], "switches": stats["switches"].sum(0),
                        "entropy": stats["entropy"].mean(),
                        "predict_layer": pred["layer_right"],
                        "predict_token": pred["token_right"]}

    return train_apply, eval_apply
