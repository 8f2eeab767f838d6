"""Sampling filters and cached generation against recomputation from scratch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perspective_jax.errors import UserError
from perspective_jax.model.generate import generate
from perspective_jax.model.sampling import Sampling, filter_logits
from perspective_jax.model.transformer import PerspectiveLM, init_params


def test_greedy_generation_equals_argmax_of_full_recompute(small_cfg):
    cfg = small_cfg
    params = init_params(cfg, jax.random.key(0))
    prompt = np.asarray(jax.random.randint(jax.random.key(5), (2, 6), 0, cfg.vocab_size))
    out = generate(cfg, params, prompt, max_new_tokens=12, sampling=Sampling(temperature=0))
    # No cache: a full causal forward over a fixed-length buffer (one compile);
    # position i's logits do not depend on the (zero) tokens after it.
    model = PerspectiveLM(cfg)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
    buf = np.zeros((2, 6 + 12), np.int32)
    buf[:, :6] = prompt
    for i in range(12):
        logits = forward(params, jnp.asarray(buf))
        nxt = np.asarray(jnp.argmax(logits[:, 6 + i - 1], -1))
        assert (nxt == out[:, i]).all(), i
        buf[:, 6 + i] = nxt


def test_top_k_and_top_p_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(filter_logits(logits, Sampling(top_k=2))))
    assert kept.tolist() == [[True, True, False, False]]
    kept = np.isfinite(np.asarray(filter_logits(logits, Sampling(top_p=0.7))))
    assert kept.tolist() == [[True, True, False, False]]
    kept = np.isfinite(np.asarray(filter_logits(logits, Sampling(top_p=0.1))))
    assert kept.tolist() == [[True, False, False, False]]


def test_sampling_is_seeded_and_respects_top_k(small_cfg):
    params = init_params(small_cfg, jax.random.key(0))
    prompt = np.zeros((1, 3), np.int32)
    s = Sampling(temperature=1.0, top_k=1)
    greedy = generate(small_cfg, params, prompt, 8, Sampling(temperature=0))
    assert (generate(small_cfg, params, prompt, 8, s, seed=3) == greedy).all()
    a = generate(small_cfg, params, prompt, 16, Sampling(temperature=1.0), seed=1)
    b = generate(small_cfg, params, prompt, 16, Sampling(temperature=1.0), seed=1)
    assert (a == b).all()


def test_bad_generation_requests(small_cfg):
    params = init_params(small_cfg, jax.random.key(0))
    with pytest.raises(UserError, match="non-empty"):
        generate(small_cfg, params, np.zeros((1, 0), np.int32), 4)
    with pytest.raises(UserError, match="ids must lie"):
        generate(small_cfg, params, np.full((1, 2), 10_000), 4)
    with pytest.raises(UserError, match="top_p"):
        Sampling(top_p=0.0)
