"""Curriculum stages: exact upcycling, routed decode, expert sharding, stage all."""

import dataclasses
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from conftest import train_overrides

from perspective_jax.cli.train import run
from perspective_jax.config import MoEConfig, load_config
from perspective_jax.model.transformer import PerspectiveLM, init_cache, init_params
from perspective_jax.train.metrics import read_metrics
from perspective_jax.train.stages import upcycle_params
from perspective_jax.train.trainer import train


def test_upcycled_model_equals_dense_model_without_noise(small_cfg):
    """Straight-through gate (value 1) + identical experts ⇒ same logits as dense."""
    dense_cfg = small_cfg
    routed_cfg = dataclasses.replace(small_cfg, routed=True)
    moe = MoEConfig(upcycle_noise=0.0)
    dense = init_params(dense_cfg, jax.random.key(0))
    routed_init = init_params(routed_cfg, jax.random.key(1), moe=moe)
    full = load_config(None, []).__class__(model=routed_cfg, moe=moe)
    params = upcycle_params(dense, routed_init, full, jax.random.key(2))
    tokens = jax.random.randint(jax.random.key(3), (2, 24), 0, small_cfg.vocab_size)
    a, _ = PerspectiveLM(dense_cfg).apply({"params": dense}, tokens)
    b, _ = PerspectiveLM(routed_cfg, moe).apply({"params": params}, tokens)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    # with noise the experts differ from each other (and from the dense FFN)
    noisy = upcycle_params(dense, routed_init, dataclasses.replace(
        full, moe=MoEConfig(upcycle_noise=0.1)), jax.random.key(2))
    w = noisy["periods"]["layer_0"]["ffn"]["w_up"]
    assert float(jnp.abs(w[:, 0] - w[:, 1]).max()) > 0


def test_routed_decode_equals_parallel_forward(small_cfg):
    cfg = dataclasses.replace(small_cfg, routed=True)
    moe = MoEConfig()
    params = init_params(cfg, jax.random.key(0), moe=moe)
    model = PerspectiveLM(cfg, moe)
    tokens = jax.random.randint(jax.random.key(4), (2, 20), 0, cfg.vocab_size)
    full, _ = model.apply({"params": params}, tokens)
    step = jax.jit(lambda p, x, c: model.apply({"params": p}, x, cache=c))
    logits, cache = step(params, tokens[:, :7], init_cache(cfg, 2))
    outs = [logits]
    for t in range(7, 20):
        logits, cache = step(params, tokens[:, t:t + 1], cache)
        outs.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full),
                               atol=1e-4, rtol=1e-4)


def test_expert_sharded_step_matches_single_device(tmp_path, text_corpus):
    base = train_overrides(**{"train.steps": 3, "model.routed": "true"})
    one = load_config(None, base + ["mesh.data=1"])
    eight = load_config(None, base + ["mesh.data=2", "mesh.expert=2", "mesh.tensor=2"])
    train(one, str(tmp_path / "one"), data=[str(text_corpus)], devices=jax.devices()[:1],
          progress=False)
    train(eight, str(tmp_path / "eight"), data=[str(text_corpus)], progress=False)
    l1 = [r["loss"] for r in read_metrics(str(tmp_path / "one"), "train")]
    l8 = [r["loss"] for r in read_metrics(str(tmp_path / "eight"), "train")]
    assert len(l1) == 3
    np.testing.assert_allclose(l8, l1, atol=1e-5)


def test_stage_all_runs_the_whole_curriculum(tmp_path, text_corpus, capsys):
    """dense → upcycle → sparse → ternary → align on a tiny model, then checks each."""
    from perspective_jax.model.transformer import abstract_params
    from perspective_jax.rundir.checkpoint import restore_params
    from perspective_jax.train.objective import effective_params
    args = ["--stage", "all", "--run-dir", str(tmp_path / "cur"), "--data", str(text_corpus),
            "--no-progress", *train_overrides(**{"train.steps": 4, "train.eval_every": 4})]
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "routing: gini" in out and "all experts reachable" in out
    assert "re-embedded experts by MDS" in out and "neighbour share" in out
    for stage in ("dense", "upcycle", "sparse", "ternary", "align"):
        assert (tmp_path / "cur" / stage / "checkpoints").is_dir(), stage
    sparse_cfg = load_config(str(tmp_path / "cur" / "sparse" / "config.yaml"))
    assert sparse_cfg.model.routed and not sparse_cfg.ternary.enabled
    evals = read_metrics(str(tmp_path / "cur" / "sparse"), "eval")
    assert "gini" in evals[-1] and len(evals[-1]["routing"]["utilisation"][0]) == 8

    # ternary: progressive fractions, distillation from the frozen sparse model
    tern = tmp_path / "cur" / "ternary"
    cfg = load_config(str(tern / "config.yaml"))
    assert cfg.ternary.enabled and cfg.model.routed
    log = read_metrics(str(tern), "train")
    assert [r["ternary_fraction"] for r in log] == [0.0, 0.25, 0.5, 0.75]
    # KL ≥ 0 up to float rounding; at step 0 the student is the teacher
    assert all(r["kd_loss"] >= -1e-6 for r in log) and abs(log[0]["kd_loss"]) < 1e-6
    # every expert weight the final model uses is in {−1, 0, +1} × one scale per matrix
    params = restore_params(str(tern), abstract_params(cfg.model, cfg.moe))
    used = effective_params(cfg, params, cfg.train.steps)
    for w in (used["periods"]["layer_0"]["ffn"][n] for n in ("w_gate", "w_up", "w_down")):
        w = np.asarray(w)                                          # [P, E, a, b]
        scale = np.abs(w).max(axis=(-2, -1), keepdims=True)
        assert set(np.unique(np.round(w / scale, 4)).tolist()) <= {-1.0, 0.0, 1.0}

    # align: a short, fully ternary fine-tune after the MDS re-embedding
    align_cfg = load_config(str(tmp_path / "cur" / "align" / "config.yaml"))
    assert align_cfg.ternary.schedule == (1.0,) and align_cfg.train.steps == 1

    # the torus picture of the sparse run
    png = tmp_path / "torus.png"
    tool = str(pathlib.Path(__file__).parents[2] / "tools" / "plot_manifold.py")
    subprocess.run([sys.executable, tool, str(tmp_path / "cur" / "sparse"),
                    "--out", str(png)], check=True, capture_output=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # re-running the finished curriculum resumes every stage and succeeds
    assert run(args) == 0

    # export the curriculum's result and stream text from it
    from perspective_jax.cli import export, infer
    capsys.readouterr()
    model = str(tmp_path / "model")
    assert export.run(["--run-dir", str(tmp_path / "cur"), "--out", model]) == 0
    assert "cur/align" in capsys.readouterr().out          # the last finished stage
    assert infer.run(["--model-dir", model, "def f(", "--max-tokens", "8", "--stats",
                      "--temperature", "0", "--host-budget-mb", "0.05",
                      "--save-state", str(tmp_path / "c.state")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def f(") and len(out) > len("def f(\n")
    assert "decode_tok_per_s" in err and "prefetch_accuracy" in err
    assert infer.run(["--model-dir", model, "--resume-state", str(tmp_path / "c.state"),
                      "--max-tokens", "4"]) == 0


def test_upcycle_and_sparse_need_a_source_run(tmp_path, capsys):
    assert run(["--stage", "upcycle", "--run-dir", str(tmp_path / "u")]) == 2
    assert "--init-from" in capsys.readouterr().err
    assert run(["--stage", "sparse", "--run-dir", str(tmp_path / "s")]) == 2
    assert "--init-from" in capsys.readouterr().err
