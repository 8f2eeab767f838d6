"""Teacher-forced scoring of a streamed model with MPD's views, against the in-memory
model: P0's logits at every position, the persistent-state decisions from one
parallel pass per perspective, the forked decisions from `forked_views` at every
position; and the confidence methods' bookkeeping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perspective_jax.config.schema import MPDConfig
from perspective_jax.evaluate import confidence as C
from perspective_jax.evaluate.teacher_forced import score, segments
from perspective_jax.errors import UserError
from perspective_jax.export.exporter import with_ternary_experts
from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.options import EngineOptions
from perspective_jax.model.extensions import Extensions
from perspective_jax.model.mpd import PERSPECTIVES, decide, forked_views
from perspective_jax.model.transformer import PerspectiveLM, init_cache


def test_segments_are_spread_windows_and_short_text_is_an_error():
    ids = np.arange(100)
    segs = segments(ids, 9, 4)
    assert segs.shape == (4, 10)
    assert all(np.array_equal(s, np.arange(s[0], s[0] + 10)) for s in segs)
    assert segs[0, 0] == 0 and segs[-1, 0] == 90          # first and last window
    assert segments(ids, 9, 100).shape[0] == 11
    with pytest.raises(UserError, match="at least 10"):
        segments(np.arange(9), 9, 4)


@pytest.mark.slow
def test_scoring_matches_the_in_memory_model(exported_distinct):
    cfg, params, path = exported_distinct
    bits = cfg.ternary.activation_bits
    used = with_ternary_experts(jax.tree.map(np.asarray, params), cfg)
    segs = segments(np.random.RandomState(0).randint(0, 256, 40), 6, 2)
    mpd = MPDConfig()
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1, device_slots=3))
    got = score(engine, segs, mpd)
    engine.close()
    model = PerspectiveLM(cfg.model, cfg.moe, activation_bits=bits)
    tokens = jnp.asarray(segs[:, :-1])
    views = [model.apply({"params": used}, tokens, ext=Extensions(route=p))[0]
             for p in PERSPECTIVES]                                       # [4] × [S, T, V]
    np.testing.assert_allclose(got.logits, np.asarray(views[0]).reshape(-1, views[0].shape[-1]),
                               atol=2e-4, rtol=2e-4)
    np.testing.assert_array_equal(got.targets, segs[:, 1:].reshape(-1))
    agreement_cfg = MPDConfig(confidence="agreement")
    ref = decide(jax.nn.softmax(jnp.stack(views).reshape(4, -1, views[0].shape[-1]), -1),
                 agreement_cfg)
    p = got.mpd["persistent"]
    np.testing.assert_array_equal(p.token, np.asarray(ref.token))
    np.testing.assert_allclose(p.agreement, np.asarray(ref.agreement), atol=1e-5)
    np.testing.assert_allclose(p.mean_prob, np.asarray(ref.mean_prob), atol=1e-4)
    # forked: at every position, the views from P0's state before that token
    cache = init_cache(cfg.model, segs.shape[0])
    step = jax.jit(lambda prm, t, c: model.apply({"params": prm}, t[:, None], cache=c))
    fork = []
    for t in range(segs.shape[1] - 1):
        v, _ = forked_views(cfg.model, cfg.moe, used, jnp.asarray(segs[:, t]), cache, bits)
        fork.append(decide(jax.nn.softmax(v, -1), agreement_cfg))
        _, cache = step(used, jnp.asarray(segs[:, t]), cache)
    f = got.mpd["forked"]
    np.testing.assert_array_equal(f.token, np.stack([np.asarray(d.token) for d in fork], 1)
                                  .reshape(-1))
    np.testing.assert_allclose(f.confidence, np.stack([np.asarray(d.confidence) for d in fork],
                                                      1).reshape(-1), atol=2e-3)
    assert not np.allclose(f.agreement, p.agreement)       # the two state modes differ
    # the methods: fitted on one half, every method's outcome is what it claims
    half = got.segment == 0
    conf = C.methods(got.select(half), got.select(~half), mpd)
    test = got.select(~half)
    assert np.array_equal(conf["softmax"][1], test.logits.argmax(-1) == test.targets)
    assert np.array_equal(conf["mpd_agreement_forked"][1], test.mpd["forked"].token == test.targets)
    np.testing.assert_allclose(conf["mpd_ensemble_persistent"][0],
                               test.mpd["persistent"].mean_prob)
    rows = C.table(conf)
    assert set(rows) == set(C.METHODS)
    assert all(0 <= r.ece <= 1 for r in rows.values())
