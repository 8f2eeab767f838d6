"""Adapter files round-trip and refuse another model, another shape or a changed
byte in one line; the rails roll a poisoned update back to the exact checkpoint."""

import dataclasses

import jax
import numpy as np
import pytest

from perspective_jax.adapt.adapter_file import AdapterSpec, load_adapters, save_adapters
from perspective_jax.adapt.rails import Rails, RailsConfig
from perspective_jax.config import PerspectiveConfig
from perspective_jax.errors import UserError
from perspective_jax.model.extensions import init_lora


def _lora(cfg, rank=4):
    lora = init_lora(cfg, jax.random.key(0), rank)
    return jax.tree.map(lambda a: np.asarray(a) + 0.5, lora)          # B ≠ 0


def test_adapter_file_round_trip_and_refusals(small_cfg, tmp_path):
    path = str(tmp_path / "a.adapter")
    cfg = PerspectiveConfig(model=dataclasses.replace(small_cfg, routed=True))
    rng = np.random.default_rng(0)
    lora = _lora(small_cfg)
    z = {f"layer_{i}": rng.random((small_cfg.n_periods, cfg.moe.num_experts, 3))
         for i in range(3)}
    save_adapters(path, lora, "model-A", AdapterSpec(rank=4, scale=0.5), coords=z)
    got, spec, coords = load_adapters(path, "model-A", cfg)
    assert spec == AdapterSpec(rank=4, targets=("w_p",), scale=0.5)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(lora)):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(got) == jax.tree.structure(jax.tree.map(np.asarray, lora))
    np.testing.assert_allclose(coords["layer_0"], z["layer_0"].astype(np.float32))
    bad = str(tmp_path / "bad.adapter")
    save_adapters(bad, lora, "model-A", AdapterSpec(), coords={"layer_0": z["layer_0"]})
    with pytest.raises(UserError, match="routed layers"):
        load_adapters(bad, "model-A", cfg)
    with pytest.raises(UserError, match="another model"):
        load_adapters(path, "model-B", cfg)
    other = str(tmp_path / "r8.adapter")
    save_adapters(other, _lora(small_cfg, 8), "model-A", AdapterSpec(rank=4))
    with pytest.raises(UserError, match="do not fit"):
        load_adapters(other, "model-A", cfg)
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 1
    open(path, "wb").write(bytes(data))
    with pytest.raises(UserError) as e:
        load_adapters(path, "model-A", cfg)
    assert path in str(e.value) and "\n" not in str(e.value)


def test_rails_roll_a_poisoned_update_back_exactly():
    rng = np.random.default_rng(0)
    state = {"lora": rng.normal(size=(2, 4)).astype(np.float32), "z": rng.random((8, 3))}
    rails = Rails(RailsConfig(agreement_floor=0.5, max_loss_rise=0.1), 0.8, 2.0)
    kept = []
    # a stream: two good updates, then a poisoned one (loss jumps), then agreement falls
    for loss, agreement, poison in ((1.95, 0.8, 0.01), (1.9, 0.75, 0.01),
                                    (2.6, 0.7, 5.0), (1.9, 0.3, 5.0)):
        rails.checkpoint(state)
        before = jax.tree.map(np.copy, state)
        new = jax.tree.map(lambda a: a + poison, state)
        state, why = rails.judge(new, agreement, loss)
        kept.append(why is None)
        if why is not None:
            for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(before)):
                np.testing.assert_array_equal(a, b)                 # exactly as before
    assert kept == [True, True, False, False]
    assert "loss" in rails.rollbacks[0] and "agreement" in rails.rollbacks[1]
    assert Rails(RailsConfig(), 0.8, 2.0).verdict(0.8, float("nan")) is not None
    with pytest.raises(UserError):
        Rails(RailsConfig(), 0.8, 2.0).judge(state, 0.0, 9.0)
