"""perspective-budget --train (`perspective_jax.train.plan`): the per-device parameter
and optimizer bytes against real sharded arrays on the 8 host devices (conftest), the
derived state against XLA's compiled train step (tools/compile_train_plan.py, its own
process), the 1.05T preset's figures by hand, and one-line errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from perspective_jax.cli import budget
from perspective_jax.config import load_config
from perspective_jax.model.transformer import abstract_params, logical_axes
from perspective_jax.train import plan
from perspective_jax.train import sharding as shd
from perspective_jax.train.stages import stage_config
from perspective_jax.train.step import make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FULL = os.path.join(REPO, "curricula", "perspective-1t.yaml")
TINY = os.path.join(REPO, "curricula", "tiny.yaml")
TOOL = os.path.join(REPO, "tools", "compile_train_plan.py")
MESHES = {  # every axis used; and dimensions the tensor axis does not divide
    "fsdp2-expert2-tensor2": ["mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"],
    "tensor4-undivided": ["mesh.fsdp=2", "mesh.tensor=4", "model.d_ff=390",
                          "model.n_kv_heads=2", "train.batch_size=8"],
}
OPT = "optimizer state (AdamW m, v)"


def device0_bytes(tree) -> int:
    d0 = jax.devices()[0]
    return sum(s.data.nbytes for a in jax.tree.leaves(tree) for s in a.addressable_shards
               if s.device == d0)


@pytest.mark.parametrize("mesh, stage", [("fsdp2-expert2-tensor2", "sparse"),
                                         ("tensor4-undivided", "ternary")])
def test_state_bytes_equal_the_real_shards_of_device_0(mesh, stage):
    """Reference: real parameter arrays placed on the 8 devices with the trainer's
    shardings, and AdamW's state made by optax itself from them (eagerly: each moment
    keeps its parameter's sharding); the bytes device 0 holds."""
    cfg = stage_config(load_config(TINY, MESHES[mesh]), stage)
    real = shd.make_mesh(cfg.mesh, jax.devices())
    shapes = abstract_params(cfg.model, cfg.moe)
    p_shard = shd.param_shardings(logical_axes(cfg.model, cfg.moe), shapes, real)
    params = jax.tree.map(lambda a, s: jax.device_put(np.zeros(a.shape, a.dtype), s),
                          shapes, p_shard)
    opt_state = make_optimizer(cfg.train).init(params)
    p = plan.train_plan(cfg, 8)
    assert p["state"]["parameters"] == device0_bytes(params)
    assert p["state"][OPT] == device0_bytes(opt_state)
    assert p["state"].get("teacher (frozen copy)", 0) == (device0_bytes(params)
                                                           if stage == "ternary" else 0)
    whole = plan.train_plan(cfg, 8, optimizer="replicated")["state"][OPT]
    assert whole == sum(a.nbytes for a in jax.tree.leaves(opt_state))
    if mesh == "tensor4-undivided":      # d_ff 390 and 2 kv heads stay whole over tensor 4
        assert p["layout"]["params"]["replicated_leaves"] > 0
        ffn = params["periods"]["layer_3"]["ffn"]["w_gate"]["kernel"]
        assert ffn.sharding.shard_shape(ffn.shape)[-1] == 390


def test_compiled_train_step_arguments_equal_the_derived_state():
    """XLA's own argument bytes (the donated state and the batch) of the trainer's step,
    compiled for 8 fake devices, equal the derived state plus the batch — both with the
    state shardings the trainer's initialisation produces and with `sharded` moments.
    The temporaries are not compared: a tiny model's are dominated by fixed costs."""
    small = [*MESHES["fsdp2-expert2-tensor2"], "data.seq_len=32", "train.batch_size=8"]
    proc = subprocess.run([sys.executable, TOOL, "--devices", "8", "--config", TINY,
                           "--stage", "dense", "--optimizer-state", "trainer,sharded",
                           "--json", *small], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)
    assert r["mesh"] == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
    for run in r["runs"]:
        assert run["moments_layout"] in plan.OPTIMIZER_LAYOUTS
        # the derived state leaves out the train step counter: one int32
        assert run["state_bytes"] - run["derived"]["state"] == 4, run
        assert run["batch_bytes"] == 1 * (8 // 4) * 33 * 4     # [accum, micro/4, T+1] int32
    # the trainer's own initialisation (`plan.initial_state`) shards AdamW's moments
    assert [run["moments_layout"] for run in r["runs"]] == ["sharded", "sharded"]
    assert r["runs"][0]["state_bytes"] == r["runs"][1]["state_bytes"]


P_, D, F, R, E, V = 20, 4096, 11008, 256, 128, 32768


def test_full_preset_per_device_parameters_by_hand():
    """1,024 devices: data 4 × fsdp 8 × expert 8 × tensor 4 (the preset's mesh)."""
    cfg = stage_config(load_config(FULL), "sparse")
    p = plan.train_plan(cfg, 1024)
    pdr = (P_ + P_ * E * 3 // 8 + P_ * D * 3 // 8 + 3 * P_ * E * D * F // 256 + 2 * P_ * D
           + P_ * D // 4 + 2 * P_ * D * R // 8 + 3 * P_ * D * D // 32)
    gqa = 3 * P_ * D * F // 32 + 2 * P_ * D + 2 * P_ * D * 8 * 128 // 32 + 2 * P_ * D * 4096 // 32
    heads = (3 * P_ + 1) * D * E // 8      # expert-predictor heads [d, E]: embed over fsdp
    elements = V * D // 32 + D + 3 * pdr + gqa + heads
    assert p["state"]["parameters"] == 4 * elements                        # float32
    assert p["state"][OPT] == 2 * 4 * elements + 2 * 4                     # + two int32 counts
    assert p["step"]["gradients"] == 2 * 4 * elements
    assert p["batch"]["sequences_per_device"] == 1024 // 256 and p["mesh"]["data"] == 4
    assert p["step"]["logits (float32)"] == 4 * 4096 * (V // 4) * 4 * 6
    assert p["step"]["activations: period inputs (remat)"] == 20 * 4 * 4096 * D * 2
    assert p["step"]["activations: period inputs, float32 copy"] == 20 * 4 * 4096 * D * 4
    # 256 devices with data 1: the same state per device (data only replicates it)
    q = plan.train_plan(stage_config(load_config(FULL, ["mesh.data=1"]), "sparse"), 256)
    assert q["state"] == p["state"] and q["batch"]["sequences_per_device"] == 16
    assert not p["fits"] and not q["fits"]


def test_step_time_and_tensor_sharded_terms(capsys):
    assert budget.run(["--train", "--json", "--mfu", "0.5", "--peak-tflops", "1000"]) == 0
    r = json.loads(capsys.readouterr().out)
    t = r["time"]
    assert t["tokens_per_step"] == 1024 * 4096
    assert t["step_s"] == pytest.approx(t["flops_per_token"] * 1024 * 4096
                                        / (1024 * 1000e12 * 0.5))
    assert t["hardware_flops"] == pytest.approx(t["model_flops"] * 4 / 3)   # remat=full
    assert 6 * r["model"]["active_params_per_token"] <= t["flops_per_token"]
    assert r["flags"]["mfu"] == 0.5 and r["usable_bytes"] == int(80 * 0.9 * 2 ** 30)
    # the tensor axis divides the PDR rows, heads and mlp; not the residual stream
    assert plan.period_bytes(load_config(FULL), 4)["pdr"] < plan.period_bytes(
        load_config(FULL), 1)["pdr"]


def test_markdown(capsys):
    assert budget.run(["--train", "--devices", "2048", "mesh.data=1", "mesh.fsdp=64"]) == 0
    out = capsys.readouterr().out
    assert "# Training plan: perspective-1t, stage sparse, on 2,048 devices" in out
    assert "Mesh data 1 × fsdp 64 × expert 8 × tensor 4" in out
    assert "| **total** |" in out and ": PASS," in out and "**step time**" in out


@pytest.mark.parametrize("args, message", [
    (["--train", "--devices", "100"], "mesh: 100 devices are not divisible by the fixed axes"),
    (["--train", "--devices", "256", "mesh.data=2"], "needs 512 devices but 256 are"),
    (["--train", "--devices", "1024", "train.batch_size=1000"],
     "micro-batch 1000 (train.batch_size / train.grad_accum) is not divisible by the 256"),
    (["--train", "--devices", "0"], "argument --devices: must lie in [1, "),
    (["--train", "--mfu", "1.5"], "argument --mfu: must lie in (0, 1], got 1.5"),
    (["--train", "--peak-tflops", "0"], "argument --peak-tflops: must lie in (0, "),
    (["--train", "--stage", "upcycle"], "argument --stage: invalid choice"),
    (["--devices", "8"], "--devices applies to --train only"),
    (["--mfu", "0.3"], "--mfu applies to --train only"),
])
def test_bad_train_input_is_one_line(capsys, args, message):
    assert budget.run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
