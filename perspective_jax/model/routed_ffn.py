"""Torus router + stacked SwiGLU experts: the routed FFN after each PDR layer.

    z_t = (Σ_s λ^{t-s} W_route h_s / Σ_s λ^{t-s}) mod 1 ∈ T³   (λ = moe.route_smoothing;
          the sums restart where segment_pos = 0; λ = 0: z = (W_route h) mod 1)
    d²_e = geodesic²(z, pos_e),   pos_e = lattice_e + offset_e
    e* = policy(d², z) (nearest: argmin_e d²_e),   ℓ = log_softmax_e(−d²/τ)[e*]
    y  = FFN_{e*}(h) · gate,      gate = exp(ℓ − stop_gradient(ℓ))   (moe.gate=straight_through)
                                  gate = exp(ℓ) = g                  (moe.gate=softmax)

The straight-through gate has value exactly 1 (exp(0), no division: a chosen
expert whose softmax weight underflows — the antipode, say — still gets 1, not
0/0), so an upcycled model (all experts equal) computes what the dense model
did, while the task loss still trains W_route, the offsets and τ through
∂ℓ = ∂g/g. `policy` is an `extensions.RoutePolicy` or `RowRoutes` (the routing
perspectives of SPEC §3.6); `gated_residual` is the routed block's residual,
shared with the streaming engine. Routing statistics and the
balance/smoothness losses are sown into the "aux" collection.

Expert prediction (SPEC §3.5, prefetch): each routed FFN also holds a linear
head `predictor` on the router's input, logits over the *next* expert layer's
experts; `PerspectiveLM` holds one on its final normed state (the next token's
layer-0 experts). Both see sg(input), so they never change the LM's logits or
gradients; they sow their logits and the chosen expert for the loss
(`train.objective.predictor_terms`).

activation_bits=8 (ternary stage, SPEC §3.4): the expert input h and the
hidden activation are fake-quantised per token to int8 absmax (STE), as a
BitNet b1.58 layer sees them.
"""

from __future__ import annotations


import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.config import ModelConfig, MoEConfig
from perspective_jax.config.choices import ROUTE_MODES
from perspective_jax.model.extensions import NEAREST, Route, RowRoutes
from perspective_jax.model.layers import dtype_of, flat_dot, logical
from perspective_jax.moe import torus
from perspective_jax.moe.dispatch import expert_swiglu
from perspective_jax.quant.ternary import quantize_activations_int8



def select_expert(dist_sq, mode: str = "nearest", k: int = 0, key=None, z=None, pos=None):
    """Expert index per token from squared distances [..., E].

    nearest: argmin; kth: the k-th nearest (k=1: second); antipode: nearest to
    the antipode of z (needs z [..., 3] and pos [E, 3]); random: uniform (key: one
    key, or one per token [...] as `random_keys` makes).
    """
    if mode == "nearest":
        return jnp.argmin(dist_sq, axis=-1)
    if mode == "kth":
        return jnp.argsort(dist_sq, axis=-1)[..., k]
    if mode == "antipode":
        return jnp.argmin(torus.geodesic_distance_sq(torus.antipode(z)[..., None, :], pos),
                          axis=-1)
    if mode == "random":
        n = dist_sq.shape[-1]
        if key.shape == dist_sq.shape[:-1] and key.ndim:
            return jax.vmap(lambda k: jax.random.randint(k, (), 0, n))(
                key.reshape(-1)).reshape(key.shape)
        return jax.random.randint(key, dist_sq.shape[:-1], 0, n)
    raise ValueError(f"unknown route mode {mode!r}; use one of {ROUTE_MODES}")


def route_experts(policy: Route, dist_sq, z, pos, segment_pos, period, layer: int):
    """Expert index [B, T] by `policy` from squared distances dist_sq [B, T, E], the
    query z [B, T, 3] and the expert positions pos [E, 3]; a `RowRoutes` policy routes
    row b by its policy b mod n. `segment_pos` [B, T], `period`, `layer` seed "random"."""
    if isinstance(policy, RowRoutes):
        picks = jnp.stack([route_experts(p, dist_sq, z, pos, segment_pos, period, layer)
                           for p in policy.policies])                   # [n, B, T]
        rows = jnp.arange(dist_sq.shape[0])
        return picks[rows % len(policy.policies), rows]
    key = None
    if policy.mode == "random":
        if segment_pos is None:
            segment_pos = jnp.broadcast_to(jnp.arange(dist_sq.shape[1]), dist_sq.shape[:2])
        key = random_keys(policy.seed, period, layer, segment_pos)
    return select_expert(dist_sq, policy.mode, policy.k, key, z, pos)


def random_keys(seed: int, period, layer: int, segment_pos):
    """One key per token [B, T] for the seeded random perspective: drawn from
    (seed, period, layer, position), so decoding token by token and a parallel pass
    draw the same experts."""
    base = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), period), layer)
    flat = jax.vmap(lambda p: jax.random.fold_in(base, p))(segment_pos.reshape(-1))
    return flat.reshape(segment_pos.shape)


PREDICTOR = "predictor"                        # ffn/predictor/w: head (a), [d, E]
NEXT_TOKEN_PREDICTOR = "next_token_predictor"  # /next_token_predictor/w: head (b)


def predictor_logits(w, hn):
    """Expert logits [..., E] = sg(hn) [..., d] · w [d, E], float32. The input's
    gradient is stopped: a head learns from its own loss and moves nothing else."""
    return flat_dot(jax.lax.stop_gradient(hn).astype(jnp.float32), w.astype(jnp.float32))


class ExpertPredictor(nn.Module):
    """hn [B, T, d] → logits [B, T, E] (`predictor_logits`); w starts at 0 (uniform
    guesses), so a head added to a trained model changes nothing until it learns."""

    n_experts: int

    @nn.compact
    def __call__(self, hn):
        w = self.param("w", logical(nn.initializers.zeros, ("embed", None)),
                       (hn.shape[-1], self.n_experts), jnp.float32)
        return predictor_logits(w, hn)


def routed_gate(moe: MoEConfig, log_p):
    """The factor the chosen expert's output is multiplied by, from ℓ = log g [B, T]:
    straight-through exp(ℓ − sg(ℓ)) (value exactly 1, gradient ∂g/g), or g itself."""
    if moe.gate == "straight_through":
        return jnp.exp(log_p - jax.lax.stop_gradient(log_p))
    return jnp.exp(log_p)


def gated_residual(h, y, gate):
    """h [B, T, d] + y [B·T or B, T, d] · gate [B, T]: the routed block's residual."""
    return (h + y.reshape(h.shape) * gate[..., None].astype(y.dtype)).astype(h.dtype)


def switch_kinds(idx, neighbours):
    """Counts of adjacent-token expert switches: [same, lattice neighbour, other].

    idx: [B, T]; neighbours: [E, E] bool adjacency."""
    a, b = idx[:, :-1], idx[:, 1:]
    same = a == b
    near = neighbours[a, b] & ~same
    return jnp.stack([same.sum(), near.sum(), (~same & ~near).sum()]).astype(jnp.float32)


def locality_loss(idx, probs, adjacency):
    """−mean_t log Σ_{e ∈ N⁺(e*_t)} p_{t+1}(e): how unlikely token t+1's router finds
    the lattice neighbourhood N⁺ (the expert itself and its neighbours) of token t's
    expert. idx [B, T]; probs [B, T, E]; adjacency [E, E] bool (numpy). 0 for T = 1."""
    if idx.shape[1] < 2:
        return jnp.zeros((), jnp.float32)
    near = jnp.asarray(adjacency | np.eye(adjacency.shape[0], dtype=bool))
    mask = near[idx[:, :-1]]                                            # [B, T-1, E]
    mass = jnp.sum(jnp.where(mask, probs[:, 1:], 0.0), -1)
    return -jnp.mean(jnp.log(jnp.maximum(mass, 1e-30)))


def context_average(u, segment_pos, state, decay: float):
    """The router's context average: u [B, T, 3] (W_route h, unwrapped) →
    (u_avg [B, T, 3], new state [B, 4]).

        p_t = a_t p_{t-1} + u_t,   c_t = a_t c_{t-1} + 1,   u_avg_t = p_t / c_t,
        a_t = λ if segment_pos_t > 0 else 0     (a sequence's first token restarts it)

    `state` [B, 4] = (p, c) after the tokens before these (None: nothing before);
    `segment_pos` [B, T] (None: 0..T-1). One associative scan over T, so a window
    and the same tokens fed one by one give the same averages. λ = 0: u itself."""
    b, t, _ = u.shape
    if segment_pos is None:
        segment_pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    vals = jnp.concatenate([u.astype(jnp.float32), jnp.ones((b, t, 1), jnp.float32)], -1)
    if decay == 0.0:
        return u, vals[:, -1]
    a = jnp.where(segment_pos > 0, decay, 0.0).astype(jnp.float32)            # [B, T]
    if state is not None:
        vals = vals.at[:, 0].add(a[:, 0, None] * state.astype(jnp.float32))

    def combine(left, right):
        (a1, v1), (a2, v2) = left, right
        return a1 * a2, a2[..., None] * v1 + v2

    _, acc = jax.lax.associative_scan(combine, (a, vals), axis=1)
    return acc[..., :3] / acc[..., 3:], acc[:, -1]


class TorusRouter(nn.Module):
    """h: [B, T, d] → (expert index [B, T], gate [B, T] (`routed_gate`), z [B, T, 3],
    probs [B, T, E], route state [B, 4] after the last token (`context_average`)).
    `route_state` [B, 4]: the state before these tokens (a decode cache's), or None.
    `segment_pos` [B, T] restarts the context average; with `period` and `layer` it
    seeds the random perspective."""

    cfg: ModelConfig
    moe: MoEConfig
    policy: Route = NEAREST

    @nn.compact
    def __call__(self, h, segment_pos=None, period=0, layer: int = 0, route_state=None):
        moe = self.moe
        d = h.shape[-1]
        w_route = self.param(
            "w_route", logical(nn.initializers.normal(moe.route_init_scale / d ** 0.5),
                               ("embed", None)), (d, 3), jnp.float32)
        offsets = self.param("offsets", logical(nn.initializers.normal(moe.offset_init_scale),
                                                ("expert", None)),
                             (moe.num_experts, 3), jnp.float32)
        log_tau = self.param("log_temperature", nn.initializers.constant(
            jnp.log(moe.router_temperature)), (), jnp.float32)
        pos = torus.wrap(jnp.asarray(torus.lattice_positions(moe.lattice)) + offsets)
        u, new_state = context_average(flat_dot(h.astype(jnp.float32), w_route),
                                       segment_pos, route_state, moe.route_smoothing)
        z = torus.wrap(u)
        dist_sq = torus.geodesic_distance_sq(z[..., None, :], pos)          # [B,T,E]
        tau = jnp.exp(log_tau) if moe.learn_temperature else moe.router_temperature
        probs = jax.nn.softmax(-dist_sq / tau, axis=-1)
        log_probs = jax.nn.log_softmax(-dist_sq / tau, axis=-1)
        idx = route_experts(self.policy, dist_sq, z, pos, segment_pos, period, layer)
        log_p = jnp.take_along_axis(log_probs, idx[..., None], axis=-1)[..., 0]
        return idx, routed_gate(moe, log_p), z, probs, new_state


class RoutedFFN(nn.Module):
    """x: [B, T, d] → (FFN_{e*}(x) · gate [B, T, d], route state [B, 4]); top-1 routed
    SwiGLU experts, dropless; `route_state` [B, 4] or None: the router's context
    average before these tokens (`context_average`). `route_only=True` creates no
    expert weights (nor the predictor head) and returns the router's (idx, gate, route
    state) — what the streaming engine computes before it fetches an expert. Sows, besides the routing statistics, "choice" (idx [B, T]) and
    "next_logits" (the predictor head's logits for the next expert layer [B, T, E])."""

    cfg: ModelConfig
    moe: MoEConfig
    policy: Route = NEAREST
    activation_bits: int = 0

    @nn.compact
    def __call__(self, x, segment_pos=None, period=0, layer: int = 0,
                 route_only: bool = False, route_state=None):
        cfg, moe = self.cfg, self.moe
        b, t, d = x.shape
        e, f = moe.num_experts, cfg.d_ff
        pdt, dt = dtype_of(cfg.param_dtype), dtype_of(cfg.dtype)
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=2)
        router = TorusRouter(cfg, moe, self.policy, name="router")
        if route_only:
            idx, gate, _, _, new_state = router(x, segment_pos, period, layer, route_state)
            return idx, gate, new_state
        w_gate = self.param("w_gate", logical(init, ("expert", "embed", "mlp")), (e, d, f), pdt)
        w_up = self.param("w_up", logical(init, ("expert", "embed", "mlp")), (e, d, f), pdt)
        w_down = self.param("w_down", logical(init, ("expert", "mlp", "embed")), (e, f, d), pdt)
        idx, gate, z, probs, new_state = router(x, segment_pos, period, layer, route_state)
        quant = quantize_activations_int8 if self.activation_bits == 8 else (lambda a: a)
        y = expert_swiglu(quant(x.reshape(b * t, d).astype(dt)), idx.reshape(-1),
                          w_gate.astype(dt), w_up.astype(dt), w_down.astype(dt),
                          impl=moe.dispatch, block=moe.dispatch_block,
                          hidden_fn=quant).reshape(b, t, d)
        y = y * gate[..., None].astype(y.dtype)
        chex.assert_shape(y, (b, t, d))
        self._sow_statistics(idx, z, probs)
        self.sow("aux", "choice", idx.astype(jnp.int32))
        self.sow("aux", "next_logits", ExpertPredictor(e, name=PREDICTOR)(x))
        return y, new_state

    def _sow_statistics(self, idx, z, probs):
        e = self.moe.num_experts
        counts = jnp.zeros((e,), jnp.float32).at[idx.reshape(-1)].add(1.0)
        n = idx.size
        prob_sum = probs.reshape(-1, e).sum(0)
        balance = e * jnp.sum((counts / n) * (prob_sum / n))          # Switch f·P
        step = torus.signed_step(z[:, :-1], z[:, 1:])
        smooth = jnp.sqrt(jnp.sum(step ** 2, -1) + 1e-12).mean() if z.shape[1] > 1 else 0.0
        entropy = -jnp.sum(probs * jnp.log(probs + 1e-12), -1).mean()
        adjacency = torus.neighbour_matrix(self.moe.lattice)
        stats = {"balance": balance, "smooth": jnp.asarray(smooth, jnp.float32),
                 "local": locality_loss(idx, probs, adjacency),
                 "counts": counts, "prob_sum": prob_sum, "entropy": entropy,
                 "switches": switch_kinds(idx, jnp.asarray(adjacency))}
        for key, value in stats.items():
            self.sow("aux", key, value)

