"""Trainer: exact resume after SIGKILL, sharded == single device, guards, signals."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import train_overrides

from perspective_jax.config import load_config
from perspective_jax.errors import UserError
from perspective_jax.model.transformer import abstract_params
from perspective_jax.rundir.checkpoint import restore_params
from perspective_jax.train.metrics import read_metrics
from perspective_jax.train.trainer import train


def cli(run_dir, corpus, *overrides):
    return [sys.executable, "-m", "perspective_jax.cli.train", "--stage", "dense",
            "--run-dir", str(run_dir), "--data", str(corpus), "--no-progress",
            *overrides]


def final_params(run_dir, cfg):
    return restore_params(str(run_dir), abstract_params(cfg.model))


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(str(run_dir), "train")}


def wait_for_checkpoint(run_dir, step, proc, timeout=240):
    path = run_dir / "checkpoints" / str(step) / "checksums.json"   # listed: complete
    t0 = time.time()
    while not path.is_file():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.stderr.read()}")
        if time.time() - t0 > timeout:
            raise AssertionError("no checkpoint appeared")
        time.sleep(0.02)


def test_sigkill_then_resume_is_exact(tmp_path, text_corpus):
    """Kill -9 after the step-6 checkpoint; the resumed run's losses and final
    parameters are bit-identical to an uninterrupted run's."""
    ov = train_overrides(**{"train.steps": 40, "checkpoint.every": 6})
    cfg = load_config(None, ov)
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(cli(ref_dir, text_corpus, *ov), check=True, capture_output=True)
    proc = subprocess.Popen(cli(cut_dir, text_corpus, *ov), stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(cut_dir, 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(losses(cut_dir))
    assert killed_at < 40, "the run finished before it could be killed"
    subprocess.run(cli(cut_dir, text_corpus, *ov), check=True, capture_output=True)
    assert losses(cut_dir) == losses(ref_dir)
    a, b = final_params(ref_dir, cfg), final_params(cut_dir, cfg)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_sharded_training_matches_single_device(tmp_path, text_corpus):
    assert len(jax.devices()) == 8
    base = train_overrides(**{"train.steps": 4})
    cfg1 = load_config(None, base + ["mesh.data=1"])
    cfg8 = load_config(None, base + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    r1 = train(cfg1, str(tmp_path / "one"), data=[str(text_corpus)],
               devices=jax.devices()[:1], progress=False)
    r8 = train(cfg8, str(tmp_path / "eight"), data=[str(text_corpus)], progress=False)
    l1, l8 = losses(tmp_path / "one"), losses(tmp_path / "eight")
    assert sorted(l1) == [1, 2, 3, 4]
    np.testing.assert_allclose([l8[s] for s in sorted(l8)], [l1[s] for s in sorted(l1)],
                               atol=1e-5)
    p1, p8 = final_params(tmp_path / "one", cfg1), final_params(tmp_path / "eight", cfg8)
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
    assert r1.step == r8.step == 4


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path, text_corpus):
    ov = train_overrides(**{"train.steps": 400, "checkpoint.every": 1000})
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(cli(run_dir, text_corpus, *ov), stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not losses(run_dir) and time.time() - t0 < 240:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "rerun the same command to resume" in err
    saved = sorted(int(p) for p in os.listdir(run_dir / "checkpoints") if p.isdigit())
    assert saved and saved[-1] < 400
    done = subprocess.run(cli(run_dir, text_corpus, *ov[:-2], "train.steps=" + str(saved[-1] + 2),
                              *ov[-1:]), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert max(losses(run_dir)) == saved[-1] + 2


def test_nonfinite_steps_stop_with_last_good_checkpoint(tmp_path, text_corpus, monkeypatch):
    import perspective_jax.train.trainer as trainer_mod
    real = trainer_mod.make_train_step

    def poisoned(apply_fn, tx, schedule, **kwargs):
        step = real(apply_fn, tx, schedule, **kwargs)

        def wrapped(state, batch):
            new_state, m = step(state, batch)
            bad = state["step"] >= 3   # steps 4, 5, ... are non-finite
            return new_state, {**m, "finite": m["finite"] & ~bad}
        return wrapped

    monkeypatch.setattr(trainer_mod, "make_train_step", poisoned)
    cfg = load_config(None, train_overrides(**{"train.steps": 20}))
    with pytest.raises(UserError, match="non-finite steps in a row.*checkpoint \\(step 3\\)"):
        train(cfg, str(tmp_path / "run"), data=[str(text_corpus)], progress=False)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["3"]


def test_nonfinite_update_is_skipped():
    """The step itself: NaN gradients leave params and optimizer state unchanged."""
    from perspective_jax.config import TrainConfig
    from perspective_jax.train.step import (init_state, lr_schedule, make_optimizer,
                                            make_train_step)
    tcfg = TrainConfig(steps=10, warmup_steps=1)
    tx = make_optimizer(tcfg)
    params = {"w": jnp.ones((3, 3))}
    def apply_fn(p, x, context):
        logits = jnp.zeros(x.shape + (4,)) + p["w"][0, 0] * jnp.log(-1.0 + 0 * x[..., None])
        return logits, jnp.float32(0.0), {}
    step = jax.jit(make_train_step(apply_fn, tx, lr_schedule(tcfg)))
    state = init_state(params, tx)
    new, m = step(state, jnp.zeros((1, 2, 5), jnp.int32))
    assert not bool(m["finite"])
    assert np.array_equal(np.asarray(new["params"]["w"]), np.ones((3, 3)))
    assert int(new["step"]) == 1


def test_training_reduces_loss_and_writes_artifacts(tmp_path, text_corpus):
    cfg = load_config(None, train_overrides(**{"train.steps": 30, "train.eval_every": 30,
                                               "train.learning_rate": 0.01}))
    res = train(cfg, str(tmp_path / "run"), data=[str(text_corpus)], progress=False)
    l = losses(tmp_path / "run")
    assert l[30] < l[1] - 1.0
    assert res.val_loss is not None and res.val_bits_per_char > 0 and res.sample
    for name in ("config.yaml", "metrics.jsonl", "tokenizer.byte", "tb", "checkpoints"):
        assert (tmp_path / "run" / name).exists(), name
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "run" / "tb"))


def test_gradient_accumulation_matches_one_big_batch(small_cfg):
    """grad_accum=4 over micro-batches of 2 == one batch of 8 (mean loss, same update)."""
    from perspective_jax.config import TrainConfig
    from perspective_jax.model.transformer import PerspectiveLM, init_params
    from perspective_jax.train.step import (init_state, lr_schedule, make_optimizer,
                                            make_train_step)
    tcfg = TrainConfig(steps=10, warmup_steps=0, learning_rate=1e-2)
    model = PerspectiveLM(small_cfg)
    apply_fn = lambda p, x, ctx: (model.apply({"params": p}, x)[0], jnp.float32(0.0), {})
    tx = make_optimizer(tcfg)
    step = jax.jit(make_train_step(apply_fn, tx, lr_schedule(tcfg)))
    params = init_params(small_cfg, jax.random.key(0))
    batch = jax.random.randint(jax.random.key(1), (8, 17), 0, small_cfg.vocab_size)
    one, m1 = step(init_state(params, tx), batch.reshape(1, 8, 17))
    four, m4 = step(init_state(params, tx), batch.reshape(4, 2, 17))
    np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m4["grad_norm"]), rtol=1e-4)
    # Adam's first update is ≈ lr·sign(g): entries whose gradient is ~0 may differ by
    # rounding, so require near-equality almost everywhere and |Δ| ≤ 2·lr everywhere.
    diff = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel() for a, b in
                           zip(jax.tree.leaves(one["params"]), jax.tree.leaves(four["params"]))])
    assert (diff < 1e-6).mean() > 0.999 and diff.max() <= 2 * tcfg.learning_rate


def test_bfloat16_compute_trains(tmp_path, text_corpus):
    cfg = load_config(None, train_overrides(**{"train.steps": 12, "model.dtype": "bfloat16",
                                               "train.learning_rate": 0.01}))
    train(cfg, str(tmp_path / "run"), data=[str(text_corpus)], progress=False)
    l = losses(tmp_path / "run")
    assert all(np.isfinite(v) for v in l.values()) and l[12] < l[1]
