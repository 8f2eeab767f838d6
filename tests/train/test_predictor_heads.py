"""The expert-predictor heads (prefetch, SPEC §3.5): they never change the LM's logits
or gradients, their loss is the cross-entropy against the sown choices (float64 numpy
reference), training them beats the best constant guess, the align stage's re-embedding
keeps them right, and runs saved before they existed restore with fresh heads (or, to
resume, a one-line error)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from perspective_jax.config import MoEConfig, PerspectiveConfig
from perspective_jax.config.loader import from_dict
from perspective_jax.errors import ConfigError, UserError
from perspective_jax.model.routed_ffn import NEXT_TOKEN_PREDICTOR, PREDICTOR, TorusRouter
from perspective_jax.model.transformer import (PerspectiveLM, abstract_params, init_params,
                                               is_predictor_path)
from perspective_jax.rundir.checkpoint import Checkpointer, restore_params
from perspective_jax.rundir.layout import load_run_config
from perspective_jax.train.objective import make_apply_fns, predictor_terms
from perspective_jax.train.step import init_state, make_optimizer

E = 8


def _cfg(small_cfg, **moe) -> PerspectiveConfig:
    return PerspectiveConfig(model=dataclasses.replace(small_cfg, routed=True),
                             moe=MoEConfig(**moe))


def _path(p) -> str:
    return "/".join(str(k.key) for k in p)


def _random_heads(params, key, scale=1.0):
    return jax.tree_util.tree_map_with_path(
        lambda p, a: (scale * jax.random.normal(jax.random.fold_in(key, len(_path(p))), a.shape)
                      / np.sqrt(a.shape[-2])) if is_predictor_path(_path(p)) else a, params)


def _walk(cfg):
    """(period, pattern position) of every expert layer in execution order — written
    out here, not taken from the code under test."""
    return [(p, i) for p in range(cfg.model.n_periods)
            for i, kind in enumerate(cfg.model.layer_pattern) if kind == "pdr"]


def _np_ce(logits, target) -> tuple[float, int, int]:
    """(summed −log softmax(logits)[target], right argmax guesses, count), float64."""
    a = np.asarray(logits, np.float64)
    a = a - a.max(-1, keepdims=True)
    logp = a - np.log(np.exp(a).sum(-1, keepdims=True))
    t = np.asarray(target)
    picked = np.take_along_axis(logp, t[..., None], -1)[..., 0]
    return float(-picked.sum()), int((a.argmax(-1) == t).sum()), t.size


def test_predictor_weight_is_validated():
    assert MoEConfig().predictor_weight > 0
    with pytest.raises(ConfigError, match="moe.predictor_weight"):
        MoEConfig(predictor_weight=-0.5)
    assert from_dict(MoEConfig, {"predictor_weight": 0.0}).predictor_weight == 0.0


def test_heads_never_change_logits_or_lm_gradients(small_cfg):
    """Logits with random heads equal those with zero heads; the gradient of the
    whole routed loss with predictor_weight 1 equals that with 0 on every non-head
    parameter, and only the heads get a gradient from the predictor term."""
    cfg = _cfg(small_cfg)
    params = init_params(cfg.model, jax.random.key(0), moe=cfg.moe)
    heads = _random_heads(params, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.model.vocab_size)
    model = PerspectiveLM(cfg.model, cfg.moe)
    np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, tokens)[0]),
                                  np.asarray(model.apply({"params": heads}, tokens)[0]))

    def grads(weight):
        train_apply, _ = make_apply_fns(dataclasses.replace(
            cfg, moe=dataclasses.replace(cfg.moe, predictor_weight=weight)))

        def loss(p):
            logits, aux, _ = train_apply(p, tokens[:, :-1], {"step": 0})
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None],
                                       -1).mean()
            return nll + aux
        return jax.jit(jax.grad(loss))(heads)

    on, off = grads(1.0), grads(0.0)
    flat_on = dict((_path(p), a) for p, a in jax.tree_util.tree_flatten_with_path(on)[0])
    flat_off = dict((_path(p), a) for p, a in jax.tree_util.tree_flatten_with_path(off)[0])
    for name, g in flat_on.items():
        if is_predictor_path(name):
            assert float(jnp.abs(g).max()) > 0, name
            assert float(jnp.abs(flat_off[name]).max()) == 0, name
        else:
            np.testing.assert_allclose(np.asarray(g), np.asarray(flat_off[name]),
                                       rtol=1e-5, atol=1e-7, err_msg=name)


def test_predictor_loss_is_the_ce_against_sown_choices(small_cfg):
    """CE of head (a) of layer j against layer j+1's choice (crossing periods) and of
    head (b) at t against layer 0's choice at t+1, recomputed in float64."""
    cfg = _cfg(small_cfg)
    params = _random_heads(init_params(cfg.model, jax.random.key(3), moe=cfg.moe),
                           jax.random.key(4), scale=3.0)
    tokens = jax.random.randint(jax.random.key(5), (2, 10), 0, cfg.model.vocab_size)
    _, state = PerspectiveLM(cfg.model, cfg.moe).apply({"params": params}, tokens,
                                                       mutable=["aux"])
    aux = state["aux"]
    got = predictor_terms(aux, cfg)
    walk = _walk(cfg)
    assert len(walk) > len(cfg.model.layer_pattern) - 1         # crosses a period
    ffn = lambda p, i, k: np.asarray(aux["periods"][f"layer_{i}"]["ffn"][k][0][p])  # noqa
    nll = right = n = 0
    for (p, i), (p2, i2) in zip(walk, walk[1:]):
        a, r, c = _np_ce(ffn(p, i, "next_logits"), ffn(p2, i2, "choice"))
        nll, right, n = nll + a, right + r, n + c
    np.testing.assert_allclose(float(got["layer_loss"]), nll / n, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(got["layer_right"]), [right, n])
    p0, i0 = walk[0]
    a, r, c = _np_ce(np.asarray(aux["next_token_logits"][0])[:, :-1],
                     ffn(p0, i0, "choice")[:, 1:])
    np.testing.assert_allclose(float(got["token_loss"]), a / c, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(got["token_right"]), [r, c])
    # the eval statistics carry the same counts, summable across windows
    _, stats = make_apply_fns(cfg)[1](params, tokens)
    np.testing.assert_array_equal(np.asarray(stats["predict_layer"]), [right, n])


def test_training_makes_the_heads_beat_the_best_constant_guess(small_cfg):
    """A few steps of the routed objective (the LM trains too, slowly) on one batch: the
    heads' accuracy on it exceeds the share of the most frequent expert (the best
    constant guess) per target layer, for head (a), and the untrained heads'."""
    cfg = _cfg(small_cfg, balance_weight=0.0)
    params = init_params(cfg.model, jax.random.key(6), moe=cfg.moe)
    tokens = jax.random.randint(jax.random.key(7), (4, 33), 0, cfg.model.vocab_size)
    train_apply, eval_apply = make_apply_fns(cfg)
    tx = optax.multi_transform(
        {"head": optax.adam(0.05), "lm": optax.adam(1e-4)},
        jax.tree_util.tree_map_with_path(
            lambda p, _: "head" if is_predictor_path(_path(p)) else "lm", params))

    @jax.jit
    def step(p, opt):
        def loss(q):
            logits, aux, _ = train_apply(q, tokens[:, :-1], {"step": 0})
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None],
                                       -1).mean()
            return nll + aux
        g = jax.grad(loss)(p)
        u, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, u), opt

    def accuracy_and_baseline(p):
        _, stats = eval_apply(p, tokens[:, :-1])
        right, n = np.asarray(stats["predict_layer"])
        _, state = PerspectiveLM(cfg.model, cfg.moe).apply({"params": p}, tokens[:, :-1],
                                                           mutable=["aux"])
        targets = [np.asarray(state["aux"]["periods"][f"layer_{i}"]["ffn"]["choice"][0][q])
                   for q, i in _walk(cfg)[1:]]
        best = sum(np.bincount(t.ravel(), minlength=E).max() for t in targets)
        return right / n, best / n

    before, _ = accuracy_and_baseline(params)
    opt = tx.init(params)
    for _ in range(60):
        params, opt = step(params, opt)
    after, constant = accuracy_and_baseline(params)
    assert after > constant + 0.1, (after, constant, before)
    assert after > before + 0.1


def test_reembed_keeps_the_heads_right(tmp_path, small_cfg):
    """align's re-embedding moves expert weights between lattice cells but not the
    routers, so the cell a state routes to — the heads' class — is unchanged: the
    heads come out as they went in, and the router picks the same cells."""
    from safety_helpers import tiny_run
    from perspective_jax.train.stages import reembed

    def shape(params, cfg):
        params = _random_heads(params, jax.random.key(8))
        # experts of very different sizes so MDS finds a layout unlike the identity
        def spread(p, a):
            name = _path(p)
            if name.endswith(("w_gate", "w_up", "w_down")) and "/ffn/" in name:
                return a * (1.0 + 4.0 * jnp.arange(a.shape[1]).reshape(1, -1, 1, 1) % 3)
            if name.endswith("router/offsets"):
                return jnp.zeros_like(a)
            return a
        return jax.tree_util.tree_map_with_path(spread, params)

    run = tiny_run(tmp_path / "ternary", small_cfg, stage="ternary", shape_params=shape)
    src = load_run_config(run)
    before = restore_params(run, abstract_params(src.model, src.moe))
    report = reembed(src, run, str(tmp_path / "reembedded"))
    after = restore_params(str(tmp_path / "reembedded"), abstract_params(src.model, src.moe))
    moved = [not np.array_equal(np.asarray(before["periods"]["layer_0"]["ffn"]["w_up"][0, e]),
                                np.asarray(after["periods"]["layer_0"]["ffn"]["w_up"][0, e]))
             for e in range(E)]
    assert any(moved) and report["stress_after"][0] < report["stress_before"][0]
    for p, a in jax.tree_util.tree_flatten_with_path(before)[0]:
        if is_predictor_path(_path(p)):
            node = after
            for k in p:
                node = node[k.key]
            np.testing.assert_array_equal(np.asarray(node), np.asarray(a))
    hn = jax.random.normal(jax.random.key(9), (1, 16, src.model.d_model))
    router = TorusRouter(src.model, src.moe)
    pick = lambda prm: np.asarray(router.apply(                          # noqa: E731
        {"params": jax.tree.map(lambda a: a[0], prm["periods"]["layer_0"]["ffn"]["router"])},
        hn)[0])
    np.testing.assert_array_equal(pick(before), pick(after))


def _old_run(tmp_path, small_cfg, stage="sparse"):
    """A run saved before the heads existed: its params lack them."""
    from safety_helpers import tiny_run

    def strip(params, cfg):
        out = {k: v for k, v in params.items() if k != NEXT_TOKEN_PREDICTOR}
        periods = {}
        for name, layer in params["periods"].items():
            if "ffn" in layer and PREDICTOR in layer["ffn"]:
                layer = {**layer, "ffn": {k: v for k, v in layer["ffn"].items()
                                          if k != PREDICTOR}}
            periods[name] = layer
        return {**out, "periods": periods}
    return tiny_run(tmp_path / stage, small_cfg, stage=stage, shape_params=strip)


def test_a_run_from_before_the_heads_restores_with_fresh_heads(tmp_path, small_cfg):
    run = _old_run(tmp_path, small_cfg)
    cfg = load_run_config(run)
    params = restore_params(run, abstract_params(cfg.model, cfg.moe))
    heads = [a for p, a in jax.tree_util.tree_flatten_with_path(params)[0]
             if is_predictor_path(_path(p))]
    assert len(heads) == 1 + sum(k == "pdr" for k in cfg.model.layer_pattern)
    assert all(isinstance(a, jax.Array) and not np.any(np.asarray(a)) for a in heads)
    assert jax.tree.structure(params) == jax.tree.structure(
        abstract_params(cfg.model, cfg.moe))
    # a leaf other than a head missing is refused, naming it
    like = abstract_params(cfg.model, cfg.moe)
    like = {**like, "extra": {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}}
    with pytest.raises(UserError, match="lacks 1 parameters this model has .*extra/w"):
        restore_params(run, like)


def test_resuming_a_run_from_before_the_heads_is_one_clear_line(tmp_path, small_cfg):
    run = _old_run(tmp_path, small_cfg)
    cfg = load_run_config(run)
    state = init_state(init_params(cfg.model, jax.random.key(0), moe=cfg.moe),
                       make_optimizer(cfg.train))
    ckpt = Checkpointer(run, dataclasses.replace(cfg.checkpoint, async_save=False),
                        adopt=False)
    with pytest.raises(UserError, match="saved before routed models had expert-predictor "
                                        "heads.*--init-from") as err:
        ckpt.restore(ckpt.latest_step(), state)
    assert "\n" not in str(err.value)
    ckpt.close()


def test_export_of_a_run_from_before_the_heads_streams_fresh_heads(tmp_path, small_cfg):
    """The piece-by-piece export reads absent heads as zeros, as the whole restore
    does; the engine then treats them as untrained (test_learned_predictor)."""
    from perspective_jax.export.sources import CheckpointSource
    from perspective_jax.rundir.partial_restore import ParamReader
    run = _old_run(tmp_path, small_cfg, stage="align")
    cfg = load_run_config(run)
    src = CheckpointSource(ParamReader(run), abstract_params(cfg.model, cfg.moe))
    assert src.absent == {f"{NEXT_TOKEN_PREDICTOR}/w"} | {
        f"periods/layer_{i}/ffn/{PREDICTOR}/w"
        for i, k in enumerate(cfg.model.layer_pattern) if k == "pdr"}
    assert not np.any(src.leaf(f"{NEXT_TOKEN_PREDICTOR}/w"))
    period = src.period(0)
    assert period["layer_0"]["ffn"][PREDICTOR]["w"].shape == (cfg.model.d_model, E)
    assert src.chunk_bytes([f"{NEXT_TOKEN_PREDICTOR}/w"])[f"{NEXT_TOKEN_PREDICTOR}/w"] == \
        cfg.model.d_model * E * 4


def test_upcycle_builds_the_heads_from_the_routed_init(small_cfg):
    from perspective_jax.train.stages import upcycle_params
    cfg = _cfg(small_cfg)
    dense = init_params(small_cfg, jax.random.key(0))
    routed_init = _random_heads(init_params(cfg.model, jax.random.key(1), moe=cfg.moe),
                                jax.random.key(2))
    out = upcycle_params(dense, routed_init, cfg, jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(out[NEXT_TOKEN_PREDICTOR]["w"]),
                                  np.asarray(routed_init[NEXT_TOKEN_PREDICTOR]["w"]))
    np.testing.assert_array_equal(
        np.asarray(out["periods"]["layer_0"]["ffn"][PREDICTOR]["w"]),
        np.asarray(routed_init["periods"]["layer_0"]["ffn"][PREDICTOR]["w"]))
