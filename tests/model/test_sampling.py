"""The one sampling rule: ids the tokenizer lacks are never chosen, and a temperature
outside its range is a one-line error instead of NaN logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perspective_jax.errors import UserError
from perspective_jax.model.sampling import Sampling, sample_next


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
