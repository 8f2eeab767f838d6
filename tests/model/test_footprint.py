"""The memory footprint of training / export / inference, checked against references:
parameter and optimizer bytes counted from the real abstract trees, the training
estimate against XLA's memory analysis of the compiled train step."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import pytest

from conftest import train_overrides
from perspective_jax.config import load_config
from perspective_jax.errors import UserError
from perspective_jax.model import footprint as fp
from perspective_jax.model.transformer import abstract_params
from perspective_jax.train.stages import stage_config
from perspective_jax.train.step import init_state, make_optimizer

CPU = fp.Machine(host_bytes=10 ** 15)


def _cfg(stage="dense", **extra):
    return stage_config(load_config(None, train_overrides(**extra)), stage)


def _tree_bytes(tree) -> int:
    return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def _parts(cfg, stage):
    return dict(fp.train_need(cfg, stage, CPU)[0].parts)


@pytest.mark.parametrize("stage,extra", [("dense", {}), ("sparse", {}),
                                         ("dense", {"model.param_dtype": "bfloat16"})])
def test_params_and_optimizer_terms_match_the_real_trees(stage, extra):
    cfg = _cfg(stage, **extra)
    params = abstract_params(cfg.model, cfg.moe)
    opt = jax.eval_shape(lambda p: init_state(p, make_optimizer(cfg.train))["opt_state"],
                         params)
    parts = _parts(cfg, stage)
    assert parts["params"] == _tree_bytes(params)
    assert parts["gradients"] == _tree_bytes(params)              # grad_accum = 1
    assert 0 <= _tree_bytes(opt) - parts["optimizer state"] <= 64  # + AdamW's step counts


def test_distillation_stage_counts_the_teacher_and_its_logits():
    dense, ternary = _parts(_cfg("sparse"), "sparse"), _parts(_cfg("ternary"), "ternary")
    assert ternary["teacher"] == ternary["params"] == dense["params"]
    assert ternary["logits"] > dense["logits"]
    assert "teacher" not in _parts(_cfg("align"), "align")         # align: kd_weight 0


def test_training_estimate_is_not_below_what_xla_allocates():
    """The train step the trainer compiles, for a config whose logits dominate: XLA's
    arguments + temporaries never exceed the estimate (less the checkpoint copy)."""
    from perspective_jax.train.objective import make_apply_fns
    from perspective_jax.train.step import lr_schedule, make_train_step
    cfg = _cfg("dense", **{"model.vocab_size": 4096})
    tx = make_optimizer(cfg.train)
    state = jax.eval_shape(lambda p: init_state(p, tx), abstract_params(cfg.model, cfg.moe))
    step = jax.jit(make_train_step(make_apply_fns(cfg)[0], tx, lr_schedule(cfg.train)),
                   donate_argnums=(0,))
    batch = jax.ShapeDtypeStruct((1, cfg.train.batch_size, cfg.data.seq_len + 1), jnp.int32)
    stats = step.lower(state, batch).compile().memory_analysis()
    need = fp.train_need(cfg, "dense", fp.Machine(10 ** 15, n_devices=1))[0]
    estimate = need.total - dict(need.parts)["checkpoint copy"]
    assert stats.argument_size_in_bytes + stats.temp_size_in_bytes <= estimate


def test_activations_grow_with_batch_and_layers_and_shrink_with_remat():
    base = _parts(_cfg(), "dense")["activations"]
    assert _parts(_cfg(**{"train.batch_size": 16}), "dense")["activations"] > base
    assert _parts(_cfg(**{"model.n_layers": 8}), "dense")["activations"] > base
    deep = {"model.n_layers": 16}
    assert (_parts(_cfg(**deep, **{"model.remat": "full"}), "dense")["activations"]
            < _parts(_cfg(**deep), "dense")["activations"])


def test_export_need_holds_params_and_a_float32_ternary_copy():
    cfg = _cfg("ternary")
    params = abstract_params(cfg.model, cfg.moe)
    experts = sum(math.prod(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(params)
                  if any(getattr(k, "key", "") in ("w_gate", "w_up", "w_down") for k in p)
                  and a.ndim == 4)
    parts = dict(fp.export_need(cfg)[0].parts)
    assert parts["params"] == _tree_bytes(params)
    assert parts["ternarised experts"] == 4 * experts
    assert "GPTQ Hessians" in dict(fp.export_need(cfg, shared_bits=2)[0].parts)


def test_infer_host_cache_is_capped_by_the_budget_and_by_the_experts():
    cfg = _cfg("sparse")
    regions = cfg.model.n_pdr_layers * cfg.moe.num_experts
    cache = lambda mb: dict(fp.infer_need(cfg, CPU, 1000, 4096, mb)[0].parts)[  # noqa: E731
        "host expert cache"]
    assert cache(1e308) == regions * 4096                  # no overflow, all regions at most
    assert cache(1 / 1024) == 1024


@pytest.mark.parametrize("override,names", [
    ("model.vocab_size=3000000000", "model.vocab_size"),
    ("train.batch_size=4000000000", "train.batch_size × data.seq_len")])
def test_absurd_dimensions_are_refused_by_arithmetic_alone(monkeypatch, override, names):
    monkeypatch.setattr(fp, "param_counts", lambda *a: pytest.fail("census reached"))
    cfg = load_config(None, [override])
    with pytest.raises(UserError, match=f"^{names} = .*2\\^31"):
        fp.train_need(cfg, "dense", CPU)


def test_refusal_is_one_line_with_the_numbers_and_the_override():
    need = fp.Need("perspective-train --stage dense", "host",
                   (("params", 4_000_000_000), ("logits", 6_000_000_000)),
                   (("logits", "lower model.vocab_size"),))
    small = fp.Machine(host_bytes=2_000_000_000)
    with pytest.raises(UserError) as err:
        fp.refuse_oversize([need], small)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == ("perspective-train --stage dense needs ~10.00 GB of host memory (params "
                   "4.00 GB, logits 6.00 GB); this machine has 2.00 GB of host memory "
                   "available; lower model.vocab_size, or pass --allow-oversize")
    fp.refuse_oversize([need], small, allow=True)                   # the override
    fp.refuse_oversize([need], fp.Machine(host_bytes=None))         # unknown: no refusal
    fp.refuse_oversize([need], fp.Machine(host_bytes=10_000_000_000))


def test_machine_probe_reports_available_host_memory():
    with open("/proc/meminfo") as fh:
        total = int(next(line for line in fh if line.startswith("MemTotal:")).split()[1])
    machine = fp.probe_machine()
    assert 0 < machine.host_bytes <= total * 1024
    assert machine.device_bytes is None and machine.platform == "cpu"
    assert machine.n_devices == len(jax.local_devices())


def test_mesh_shards_divide_state_and_batch():
    cfg = _cfg()
    one = _parts(cfg, "dense")
    eight = dict(fp.train_need(dataclasses.replace(cfg, mesh=dataclasses.replace(
        cfg.mesh, data=-1, fsdp=2)), "dense", fp.Machine(10 ** 15, 1, "gpu", 8))[0].parts)
    assert eight["params"] == -(-one["params"] // 2)               # per device: fsdp 2
    assert eight["logits"] == one["logits"] // 8                    # batch over 8 shards
