"""The one sampling rule: ids the tokenizer lacks are never chosen, and a temperature
outside its range is a one-line error instead of NaN logits; the one scoring rule
(`log_probs`) equals a float64 log-softmax over the tokenizer's ids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perspective_jax.errors import UserError
from perspective_jax.model.sampling import Sampling, log_probs, sample_next


def test_masked_ids_are_never_sampled_by_any_rule():
    """Reference: the unmasked winner sits beyond n_valid; every rule picks below it."""
    logits = jnp.asarray(np.r_[np.zeros(6), np.full(4, 50.0)][None], jnp.float32)
    for s in (Sampling(temperature=0.0), Sampling(temperature=1.0, top_k=0),
              Sampling(temperature=2.0, top_k=8), Sampling(temperature=1.0, top_p=0.5)):
        assert int(sample_next(logits, jax.random.key(0), s)[0]) >= 6
        picks = [int(sample_next(logits, jax.random.key(i), s, n_valid=6)[0])
                 for i in range(20)]
        assert max(picks) < 6


def test_absurd_temperature_is_refused_not_nan():
    """float32(1e308) is inf: logits / inf turned the mask's -inf into NaN."""
    for bad in (1e308, 101.0, -0.5, float("nan")):
        with pytest.raises(UserError, match="temperature must lie in") as err:
            Sampling(temperature=bad)
        assert "\n" not in str(err.value)
    logits = jnp.asarray(np.r_[np.zeros(6), np.full(4, 50.0)][None], jnp.float32)
    picks = {int(sample_next(logits, jax.random.key(i), Sampling(temperature=100.0),
                             n_valid=6)[0]) for i in range(40)}
    assert picks <= set(range(6)) and len(picks) > 1


def _log_softmax64(z: np.ndarray, n_valid: int) -> np.ndarray:
    z = np.asarray(z, np.float64)[..., :n_valid]
    top = z.max(-1, keepdims=True)
    return z - top - np.log(np.exp(z - top).sum(-1, keepdims=True))


def test_log_probs_equal_a_float64_log_softmax_over_the_valid_ids():
    """Large, spread logits [2, 3, V] (float32 softmax without the max shift would
    overflow); ids >= n_valid are -inf, even the largest logit among them."""
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(2, 3, 11)) * 30 + 200).astype(np.float32)
    logits[..., 9] = 900.0                                     # beyond n_valid = 8
    got = np.asarray(log_probs(logits, 8))
    assert got.dtype == np.float32 and got.shape == logits.shape
    np.testing.assert_allclose(got[..., :8], _log_softmax64(logits, 8), rtol=0, atol=2e-5)
    assert np.isneginf(got[..., 8:]).all()
    np.testing.assert_allclose(np.exp(got.astype(np.float64)).sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(log_probs(logits)), _log_softmax64(logits, 11),
                               rtol=1e-6, atol=2e-5)                     # None: every id
