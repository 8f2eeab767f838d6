"""Checkpoint restores say where arrays go: no orbax "Sharding info not provided"."""

import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.config import CheckpointConfig
from perspective_jax.rundir.checkpoint import Checkpointer, restore_params

NOTICE = "Sharding info not provided"


def _saved_run(tmp_path):
    state = {"step": jnp.asarray(3, jnp.int32),
             "params": {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones((4,))}}
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig(every=1, keep=2, async_save=False))
    ckpt.save(3, state, None, {"note": "x"}, force=True)
    ckpt.close()
    return state


def _no_notice(caplog, caught):
    texts = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [t for t in texts if NOTICE in t], texts


def test_restore_params_passes_target_sharding(tmp_path, caplog):
    state = _saved_run(tmp_path)
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state["params"])
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params = restore_params(str(tmp_path), like)
    _no_notice(caplog, caught)
    for key in ("w", "b"):
        np.testing.assert_array_equal(np.asarray(params[key]), np.asarray(state["params"][key]))
        assert params[key].sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])


def test_checkpointer_restore_passes_target_sharding(tmp_path, caplog):
    state = _saved_run(tmp_path)
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig(every=1, keep=2, async_save=False))
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored, meta = ckpt.restore(3, state)
    ckpt.close()
    _no_notice(caplog, caught)
    assert meta == {"note": "x"} and int(restored["step"]) == 3
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]),
                                  np.asarray(state["params"]["w"]))
