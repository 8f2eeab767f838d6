"""Loss terms of the routed objective against float64 numpy references:
the sown balance (Switch E·Σ f_e·P_e) and smoothness (mean wrapped ‖z_{t+1} − z_t‖)
of a RoutedFFN, the objective's α·balance + β·delta + γ·smooth, and the
distillation direction KL(student ‖ teacher)."""

import dataclasses
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.config import MoEConfig, PerspectiveConfig, TernaryConfig, TrainConfig
from perspective_jax.model.routed_ffn import RoutedFFN
from perspective_jax.model.transformer import PerspectiveLM, init_params
from perspective_jax.train.objective import effective_params, kl_divergence, make_apply_fns

LATTICE = (2, 2, 2)


def np_kl(p_logits, q_logits):
    """mean over tokens of Σ p (log p − log q), float64."""
    def log_softmax(a):
        a = np.asarray(a, np.float64)
        a = a - a.max(-1, keepdims=True)
        return a - np.log(np.exp(a).sum(-1, keepdims=True))
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))


def np_routing(h, w_route, offsets, log_tau, lattice=LATTICE):
    """(balance, smoothness, counts) of top-1 torus routing, float64."""
    cells = np.array(list(itertools.product(*[range(n) for n in lattice])), np.float64)
    pos = np.mod(cells / np.array(lattice, np.float64) + np.asarray(offsets, np.float64), 1.0)
    z = np.mod(np.asarray(h, np.float64) @ np.asarray(w_route, np.float64), 1.0)  # [B,T,3]
    d = np.abs(z[..., None, :] - pos) % 1.0
    d2 = (np.minimum(d, 1.0 - d) ** 2).sum(-1)                                      # [B,T,E]
    logits = -d2 / np.exp(float(log_tau))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    e = d2.shape[-1]
    idx = d2.argmin(-1).ravel()
    f = np.bincount(idx, minlength=e) / idx.size
    p = probs.reshape(-1, e).mean(0)
    step = np.mod(z[:, 1:] - z[:, :-1] + 0.5, 1.0) - 0.5
    smooth = np.sqrt((step ** 2).sum(-1)).mean()
    return e * float(np.sum(f * p)), float(smooth), np.bincount(idx, minlength=e)


def np_delta(params, n_layers_pdr_names):
    """Mean over routed layers × matrices of mean |W_a − W_b| over neighbour pairs."""
    cells = list(itertools.product(*[range(n) for n in LATTICE]))
    pairs = [(a, b) for a, b in itertools.combinations(range(len(cells)), 2)
             if sum((ca - cb) % n not in (0,) for ca, cb, n in
                    zip(cells[a], cells[b], LATTICE)) == 1]
    vals = []
    for name in n_layers_pdr_names:
        ffn = params["periods"][name]["ffn"]
        for w in ("w_gate", "w_up", "w_down"):
            arr = np.asarray(ffn[w], np.float64)                                  # [P,E,..]
            vals.append(np.mean([np.abs(arr[:, a] - arr[:, b]).mean() for a, b in pairs]))
    return float(np.mean(vals))


def sown(aux, name):
    return [np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(aux)[0]
            if any(getattr(k, "key", None) == name for k in p)]


def test_routed_ffn_sows_switch_balance_and_wrapped_smoothness(small_cfg):
    cfg = dataclasses.replace(small_cfg, routed=True)
    moe = MoEConfig(lattice=LATTICE, offset_init_scale=0.1)
    x = jax.random.normal(jax.random.key(0), (3, 11, cfg.d_model))
    layer = RoutedFFN(cfg, moe)
    params = nn.unbox(layer.init(jax.random.key(1), x)["params"])
    router = dict(params["router"])
    router["w_route"] = 0.7 * jax.random.normal(jax.random.key(2), router["w_route"].shape)
    router["log_temperature"] = jnp.log(jnp.float32(0.05))
    params = {**params, "router": router}
    _, state = layer.apply({"params": params}, x, mutable=["aux"])
    balance, smooth, counts = np_routing(x, router["w_route"], router["offsets"],
                                         router["log_temperature"])
    assert (counts > 0).sum() >= 3, "routing too concentrated to test the balance term"
    np.testing.assert_allclose(sown(state["aux"], "balance")[0], balance, rtol=1e-4)
    np.testing.assert_allclose(sown(state["aux"], "smooth")[0], smooth, rtol=1e-4)
    np.testing.assert_array_equal(sown(state["aux"], "counts")[0], counts)


def _ternary_cfg(small_cfg, kd_weight=0.5):
    return PerspectiveConfig(model=dataclasses.replace(small_cfg, routed=True),
                             moe=MoEConfig(lattice=LATTICE, delta_form="float"),
                             ternary=TernaryConfig(enabled=True, kd_weight=kd_weight),
                             train=TrainConfig(steps=8, warmup_steps=0))


def test_objective_adds_weighted_aux_terms_and_kd_of_student_to_teacher(small_cfg):
    cfg = _ternary_cfg(small_cfg)
    student = init_params(cfg.model, jax.random.key(0), moe=cfg.moe)
    teacher = jax.tree.map(lambda a: 2.0 * a,
                           init_params(cfg.model, jax.random.key(1), moe=cfg.moe))
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.model.vocab_size)
    train_apply, _ = make_apply_fns(cfg)
    logits, aux_loss, m = train_apply(student, tokens, {"step": jnp.int32(5),
                                                        "teacher": teacher})
    # the student's logits are the ternarised model's; the teacher's the float model's
    t_logits = PerspectiveLM(cfg.model, cfg.moe).apply({"params": teacher}, tokens)[0]
    forward, reverse = np_kl(logits, t_logits), np_kl(t_logits, logits)
    assert abs(forward - reverse) > 0.05 * max(forward, reverse), (forward, reverse)
    np.testing.assert_allclose(float(m["kd_loss"]), forward, rtol=1e-4)
    assert abs(float(m["kd_loss"]) - reverse) > 1e-3 * reverse
    # balance / smoothness: the mean of what every routed layer sowed
    used = effective_params(cfg, student, 5)
    _, state = PerspectiveLM(cfg.model, cfg.moe).apply({"params": used}, tokens,
                                                       mutable=["aux"])
    for metric, name in (("balance_loss", "balance"), ("smoothness_loss", "smooth")):
        np.testing.assert_allclose(float(m[metric]),
                                   np.mean(np.concatenate([np.ravel(v) for v in
                                                           sown(state["aux"], name)])),
                                   rtol=1e-5)
    pdr = [f"layer_{i}" for i, k in enumerate(cfg.model.layer_pattern) if k == "pdr"]
    np.testing.assert_allclose(float(m["delta_loss"]), np_delta(student, pdr), rtol=1e-5)
    moe = cfg.moe
    expected = (moe.balance_weight * float(m["balance_loss"])
                + moe.delta_weight * float(m["delta_loss"])
                + moe.smoothness_weight * float(m["smoothness_loss"])
                + moe.predictor_weight * (float(m["predictor_layer_loss"])
                                          + float(m["predictor_token_loss"]))
                + cfg.ternary.kd_weight * forward)
    np.testing.assert_allclose(float(aux_loss), expected, rtol=1e-4)


def test_kl_divergence_is_forward_kl_in_float64():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(2, 5, 7)) * 3.0
    q = rng.normal(size=(2, 5, 7))
    got = float(kl_divergence(jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32)))
    np.testing.assert_allclose(got, np_kl(p, q), rtol=1e-5)
    assert abs(got - np_kl(q, p)) > 0.1 * np_kl(q, p)
