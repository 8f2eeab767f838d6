"""MPD decision rule (SPEC §3.6) against float64 numpy references: JSD, agreement,
the three outcomes on constructed cases, the trigger, config errors."""

import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest

from perspective_jax.errors import UserError
from perspective_jax.model.mpd import (EMIT_P0, EMIT_VOTE, PERSPECTIVES, UNCERTAIN, MPDConfig,
                                       agreement, decide, entropy, js_divergence,
                                       should_trigger)


def np_jsd(p, q):
    m = (p + q) / 2

    def kl(a, b):
        mask = a > 0
        return float(np.sum(a[mask] * np.log(a[mask] / b[mask])))
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def dist(*weights):
    w = np.asarray(weights, np.float64)
    return w / w.sum()


def test_jsd_matches_numpy_including_zeros_and_bounds():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p, q = rng.dirichlet(np.ones(7)), rng.dirichlet(np.ones(7) * 0.3)
        p[rng.integers(7)] = 0.0
        p /= p.sum()
        assert float(js_divergence(jnp.asarray(p), jnp.asarray(q))) == pytest.approx(
            np_jsd(p, q), abs=1e-6)
    one, other = dist(1, 0, 0), dist(0, 0, 1)
    assert float(js_divergence(jnp.asarray(one), jnp.asarray(other))) == pytest.approx(
        math.log(2), abs=1e-6)                                   # disjoint: ln 2
    assert float(js_divergence(jnp.asarray(one), jnp.asarray(one))) == pytest.approx(0, abs=1e-7)


def test_agreement_is_the_mean_of_the_six_pairs_batched():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(9), size=(4, 3))               # [P, B, V]
    got = np.asarray(agreement(jnp.asarray(probs)))
    for b in range(3):
        ref = np.mean([np_jsd(probs[i, b], probs[j, b])
                       for i, j in itertools.combinations(range(4), 2)])
        assert got[b] == pytest.approx(ref, abs=1e-6)


def test_calm_views_emit_p0_with_confidence_one_minus_agreement_over_tau():
    p = dist(6, 3, 1)
    probs = jnp.asarray(np.stack([p, dist(6.2, 2.8, 1), dist(5.9, 3.1, 1), p])[:, None])
    d = decide(probs, MPDConfig(tau=0.15, confidence="agreement"))
    agree = float(d.agreement[0])
    assert agree < 0.15 and int(d.kind[0]) == EMIT_P0 and int(d.token[0]) == 0
    assert float(d.confidence[0]) == pytest.approx(1 - agree / 0.15, abs=1e-6)


def test_disagreeing_views_vote_and_the_vote_confidence():
    views = [dist(1, 8, 1), dist(1, 7, 2), dist(9, 1, 0.1), dist(1, 6, 3)]   # argmax 1,1,0,1
    d = decide(jnp.asarray(np.stack(views)[:, None]), MPDConfig(tau=0.05, confidence="agreement"))
    assert int(d.kind[0]) == EMIT_VOTE and int(d.token[0]) == 1 and int(d.votes[0]) == 3
    mean_p = np.mean([views[i][1] for i in (0, 1, 3)])
    assert float(d.confidence[0]) == pytest.approx(3 / 4 * mean_p, abs=1e-6)
    ensemble = np.mean([v[1] for v in views])                    # all four views' p(token)
    assert float(d.mean_prob[0]) == pytest.approx(ensemble, abs=1e-6)
    e = decide(jnp.asarray(np.stack(views)[:, None]), MPDConfig(tau=0.05, confidence="ensemble"))
    assert float(e.confidence[0]) == pytest.approx(ensemble, abs=1e-6)
    assert int(e.token[0]) == 1


def test_no_majority_is_p0_flagged_uncertain():
    views = [dist(1, 8, 1, 1), dist(8, 1, 1, 1), dist(1, 1, 8, 1), dist(1, 1, 1, 8)]
    d = decide(jnp.asarray(np.stack(views)[:, None]), MPDConfig(tau=0.05, confidence="agreement"))
    assert int(d.kind[0]) == UNCERTAIN and int(d.token[0]) == 1
    assert float(d.confidence[0]) == 0.0
    two_two = [dist(1, 8, 1), dist(1, 8, 1.5), dist(8, 1, 1), dist(8, 1.5, 1)]
    d = decide(jnp.asarray(np.stack(two_two)[:, None]), MPDConfig(tau=0.05))
    assert int(d.kind[0]) == UNCERTAIN                           # 2-2 is not 3 of 4
    d = decide(jnp.asarray(np.stack(two_two)[:, None]), MPDConfig(tau=0.05, min_votes=2))
    assert int(d.kind[0]) == EMIT_VOTE and int(d.token[0]) == 1  # first most-voted


def test_trigger_by_position_probability_and_entropy():
    cfg = MPDConfig(every_k=8, p_min=0.6, h_max=1.0)
    sharp, flat = dist(9, 0.5, 0.5), dist(1, 1, 1)
    probs = jnp.asarray(np.stack([sharp, sharp, flat]))
    got = np.asarray(should_trigger(jnp.asarray([8, 3, 3]), probs, cfg))
    assert got.tolist() == [True, False, True]
    assert float(entropy(jnp.asarray(flat))) == pytest.approx(math.log(3), abs=1e-6)
    never = MPDConfig(every_k=0, p_min=0.0, h_max=10.0)
    assert not np.asarray(should_trigger(jnp.asarray([0, 8]), probs[:2], never)).any()


@pytest.mark.parametrize("kwargs", [dict(tau=0.0), dict(tau=1.0), dict(min_votes=1),
                                    dict(min_votes=5), dict(every_k=-1), dict(p_min=1.5),
                                    dict(h_max=-1.0)])
def test_bad_config_is_one_clear_error(kwargs):
    with pytest.raises(UserError, match="mpd"):
        MPDConfig(**kwargs)


def test_the_four_perspectives_are_the_specs():
    assert [(p.mode, p.k) for p in PERSPECTIVES] == [("nearest", 0), ("kth", 1),
                                                     ("antipode", 0), ("random", 0)]


@pytest.mark.slow
def test_forked_views_route_four_ways_from_p0s_state():
    """Through a routed model: P0's logits and cache are the plain decode step's; each
    view equals a step with its routing policy; the antipode really differs."""
    import jax

    from perspective_jax.config import ModelConfig, MoEConfig
    from perspective_jax.model.extensions import Extensions
    from perspective_jax.model.mpd import forked_views
    from perspective_jax.model.transformer import PerspectiveLM, init_cache, init_params
    moe = MoEConfig(num_experts=8, lattice=(2, 2, 2))
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, layer_pattern=("pdr",),
                      d_ff=48, pdr_rank=8, pdr_chunk=4, n_heads=4, n_kv_heads=2,
                      head_dim=8, window=8, routed=True)
    params = init_params(cfg, jax.random.key(0), moe=moe)
    model = PerspectiveLM(cfg, moe)
    prompt = jax.random.randint(jax.random.key(1), (2, 6), 0, cfg.vocab_size)
    _, cache = jax.jit(lambda p, t: model.apply({"params": p}, t, cache=init_cache(cfg, 2)))(
        params, prompt)
    token = jnp.asarray([3, 7])
    views, new_cache = forked_views(cfg, moe, params, token, cache)
    assert views.shape == (4, 2, cfg.vocab_size)
    for i in (0, 2):                                       # nearest and the antipode
        ref, ref_cache = jax.jit(lambda p, t, c: model.apply(
            {"params": p}, t[:, None], cache=c, ext=Extensions(route=PERSPECTIVES[i])))(
            params, token, cache)
        np.testing.assert_allclose(np.asarray(views[i]), np.asarray(ref[:, -1]),
                                   atol=1e-5, rtol=1e-5)
        if i == 0:
            for a, b in zip(jax.tree.leaves(new_cache), jax.tree.leaves(ref_cache)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(views[2] - views[0])).max() > 1e-4      # antipode ≠ nearest
    again, _ = forked_views(cfg, moe, params, token, cache)           # P3 is seeded
    np.testing.assert_array_equal(np.asarray(again), np.asarray(views))


def _trained_like_routed_model():
    """A 4-layer routed model whose experts differ strongly (scaled-up expert weights),
    so the four perspectives really disagree."""
    import jax

    from perspective_jax.config import ModelConfig, MoEConfig
    from perspective_jax.model.transformer import init_params
    moe = MoEConfig(num_experts=8, lattice=(2, 2, 2))
    cfg = ModelConfig(vocab_size=48, d_model=32, n_layers=4, d_ff=48, pdr_rank=8, pdr_chunk=4,
                      n_heads=4, n_kv_heads=2, head_dim=8, window=8, routed=True)
    params = init_params(cfg, jax.random.key(0), moe=moe)
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a * 12.0 if "w_down" in jax.tree_util.keystr(path) else a, params)
    return cfg, moe, params


def _manual_mpd(cfg, moe, params, prompt, n_new, mpd, persistent):
    """Reference MPD decode: each perspective stepped with its own `model.apply` (no
    RowRoutes, no tiling); `decide` on the four distributions every step."""
    import jax

    from perspective_jax.model.extensions import Extensions
    from perspective_jax.model.transformer import PerspectiveLM, init_cache
    model = PerspectiveLM(cfg, moe)
    run = jax.jit(lambda p, t, c, k: model.apply({"params": p}, t, cache=c,
                                                 ext=Extensions(route=PERSPECTIVES[k])),
                  static_argnums=3)
    b = prompt.shape[0]
    caches = [init_cache(cfg, b) for _ in PERSPECTIVES]
    if persistent:
        outs = [run(params, prompt, caches[k], k) for k in range(4)]
    else:
        _, c0 = run(params, prompt[:, :-1], caches[0], 0)
        outs = [run(params, prompt[:, -1:], c0, k) for k in range(4)]
    caches = [c for _, c in outs]
    tokens, confs, kinds = [], [], []
    for _ in range(n_new):
        probs = jax.nn.softmax(jnp.stack([lg[:, -1] for lg, _ in outs]), axis=-1)
        d = decide(probs, mpd)
        tok = np.where(np.asarray(d.kind) == EMIT_VOTE, np.asarray(d.token),
                       np.asarray(jnp.argmax(probs[0], -1)))
        tokens.append(tok)
        confs.append(np.asarray(d.confidence))
        kinds.append(np.asarray(d.kind))
        if persistent:
            outs = [run(params, jnp.asarray(tok)[:, None], caches[k], k) for k in range(4)]
            caches = [c for _, c in outs]
        else:
            c0 = caches[0]
            outs = [run(params, jnp.asarray(tok)[:, None], c0, k) for k in range(4)]
            caches = [c for _, c in outs]
    return np.stack(tokens, 1), np.stack(confs, 1), np.stack(kinds, 1)


@pytest.mark.slow
@pytest.mark.parametrize("state", ["forked", "persistent"])
def test_mpd_generation_matches_a_per_perspective_reference(state):
    """generate_mpd (views as one RowRoutes batch, greedy, MPD every step) emits the
    tokens, confidences and decisions of a loop that steps each perspective alone;
    with triggering off it is plain generation."""
    from perspective_jax.model.generate import generate, generate_mpd
    from perspective_jax.model.sampling import Sampling
    cfg, moe, params = _trained_like_routed_model()
    prompt = np.random.RandomState(0).randint(0, cfg.vocab_size, (3, 5))
    mpd = MPDConfig(every_k=1, state=state, tau=0.01, max_rate=1.0)
    tokens, steps = generate_mpd(cfg, params, prompt, 8, mpd, Sampling(temperature=0), moe=moe)
    ref_tokens, ref_conf, ref_kind = _manual_mpd(cfg, moe, params, jnp.asarray(prompt), 8, mpd,
                                                 state == "persistent")
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_allclose(np.stack([s.confidence for s in steps], 1), ref_conf, atol=1e-4)
    np.testing.assert_array_equal(np.stack([s.kind for s in steps], 1), ref_kind)
    assert all(s.triggered.all() for s in steps)
    kinds = set(np.stack([s.kind for s in steps]).ravel().tolist())
    assert len(kinds) >= 2, kinds              # the views disagree somewhere
    off = MPDConfig(every_k=0, p_min=0.0, h_max=100.0, state=state)
    plain, steps = generate_mpd(cfg, params, prompt, 8, off, Sampling(temperature=0), moe=moe)
    np.testing.assert_array_equal(plain, generate(cfg, params, prompt, 8, Sampling(temperature=0),
                                                  moe=moe))
    assert not any(s.triggered.any() for s in steps)
    capped = MPDConfig(every_k=1, state=state, max_rate=0.25)
    _, steps = generate_mpd(cfg, params, prompt, 12, capped, Sampling(temperature=0), moe=moe)
    fired = np.stack([s.triggered for s in steps], 1)            # [B, 12]
    assert fired[:, [0, 4, 8]].all() and fired.sum() == 3 * 3    # 1 per 4 tokens


def test_the_budget_rule():
    from perspective_jax.evaluate.confidence import budgeted
    from perspective_jax.model.mpd import within_budget
    assert within_budget(0, 0, 0.15) and not within_budget(1, 1, 0.15)
    assert within_budget(1, 6, 0.15) and not within_budget(1, 5, 0.15)
    fires = np.array([1, 1, 1, 1, 1, 1, 0, 1, 1, 1], bool)
    pos = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    seg = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    got = budgeted(fires, pos, seg, 0.5)
    assert got.tolist() == [1, 0, 1, 0, 1, 1, 0, 1, 0, 1]       # per segment, in order


def test_p2_routes_to_the_antipode_and_p3_is_seeded_float64_reference():
    """The perspectives' routers against numpy: P2 picks the expert nearest to
    (z + ½) mod 1 on the torus; P3's draws repeat for its seed and change with it."""
    import jax

    from perspective_jax.config import ModelConfig, MoEConfig
    from perspective_jax.model.extensions import RoutePolicy
    from perspective_jax.model.routed_ffn import TorusRouter
    from perspective_jax.moe import torus
    moe = MoEConfig(num_experts=8, lattice=(2, 2, 2))
    cfg = ModelConfig(vocab_size=48, d_model=16, n_layers=1, layer_pattern=("pdr",), d_ff=24,
                      pdr_rank=4, n_heads=2, n_kv_heads=1, head_dim=8, window=8, routed=True)
    h = jax.random.normal(jax.random.key(2), (2, 9, 16)) * 3
    router = TorusRouter(cfg, moe, PERSPECTIVES[2])
    import flax.linen as nn
    params = nn.meta.unbox(router.init(jax.random.key(3), h))
    params["params"]["offsets"] = jax.random.normal(jax.random.key(4), (8, 3)) * 0.05
    idx = np.asarray(router.apply(params, h)[0])
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    z = np.mod(np.asarray(h, np.float64) @ p["w_route"], 1.0)
    anti = np.mod(z + 0.5, 1.0)
    pos = np.mod(np.asarray(torus.lattice_positions(moe.lattice), np.float64) + p["offsets"], 1.0)
    diff = np.abs(anti[..., None, :] - pos)
    d2 = np.sum(np.minimum(diff, 1 - diff) ** 2, axis=-1)
    np.testing.assert_array_equal(idx, d2.argmin(-1))
    near = np.asarray(TorusRouter(cfg, moe, PERSPECTIVES[0]).apply(params, h)[0])
    assert (idx != near).any()
    draw = lambda seed: np.asarray(TorusRouter(cfg, moe, RoutePolicy("random", seed=seed))
                                   .apply(params, h, None, 1, 2)[0])
    np.testing.assert_array_equal(draw(0), draw(0))
    assert (draw(0) != draw(1)).any() and len(np.unique(draw(0))) > 3
