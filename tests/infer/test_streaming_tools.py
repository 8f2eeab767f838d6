"""Smoke tests of the streaming benchmark helpers (tools/streaming_models.py,
tools/profile_decode.py) on a tiny synthetic model."""

import os

import pytest

from perspective_jax.config import load_config
from perspective_jax.modeldir.manifest import read_manifest
from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.options import EngineOptions
from perspective_jax.export.synthetic import write_synthetic_model_dir
from perspective_jax.quant.quantized_kernel import QuantizedKernel

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     "tools")


@pytest.fixture
def tools_path(monkeypatch):
    monkeypatch.syspath_prepend(TOOLS)


def test_derive_quantized_links_experts_and_profile_is_compute_only(tmp_path, tools_path,
                                                                   capsys):
    import profile_decode
    from streaming_models import derive_quantized
    cfg = load_config(None, ["model.routed=true", "ternary.enabled=true", "model.d_model=64",
                             "model.d_ff=96", "model.n_layers=4", "model.vocab_size=259",
                             "moe.num_experts=8", "moe.lattice=[2,2,2]", "data.tokenizer=byte"])
    src, dst = str(tmp_path / "float"), str(tmp_path / "packed")
    write_synthetic_model_dir(src, cfg, seed=0, log=lambda *_: None)
    derive_quantized(src, dst, bits=2, group_size=32)
    manifest = read_manifest(dst)
    assert manifest["shared"]["bits"] == 2 and manifest["shared"]["quantized"]
    for name in os.listdir(os.path.join(src, "experts")):       # hard links, same bytes
        assert os.path.samefile(os.path.join(src, "experts", name),
                                os.path.join(dst, "experts", name))
    engine = StreamingEngine(dst, EngineOptions(host_budget_mb=1))
    kinds = {type(k["mixer"]["w_p"]) for layer in engine.layer_params for k in layer
             if "w_p" in k["mixer"]}
    assert kinds == {QuantizedKernel}
    engine.close()

    assert profile_decode.main([dst, "--tokens", "3", "--prompt", "4", "--host-mb", "8"]) == 0
    out = capsys.readouterr().out
    assert "full transfers in the timed windows: 0" in out
    assert "| expert_token |" in out and "| mixer:pdr |" in out


def test_probe_prefetch_top1_is_the_engines_router_guess(tmp_path, tools_path, capsys):
    """The probe's top-1 next-layer rate equals the engine's own prefetch accuracy
    with the router predictor (same guesses, counted independently)."""
    import numpy as np
    import probe_prefetch
    cfg = load_config(None, ["model.routed=true", "ternary.enabled=true", "model.d_model=64",
                             "model.d_ff=96", "model.n_layers=4", "model.vocab_size=259",
                             "moe.num_experts=8", "moe.lattice=[2,2,2]", "data.tokenizer=byte"])
    path = str(tmp_path / "model")
    write_synthetic_model_dir(path, cfg, seed=0, log=lambda *_: None)
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=8, predictor="router"))
    tokens = np.frombuffer(probe_prefetch.TEXT, np.uint8).astype(np.int32)[:24]
    result = probe_prefetch.probe(engine, tokens, top=8, ahead=2)
    engine.close()
    right, n = result["top-1, next layer"]
    assert n == engine.stats.predictions > 0 and right == engine.stats.predicted_right
    assert result["top-8, next layer"] == (n, n)           # all 8 experts: always right
    assert result["top-1, 2 layers ahead"][1] < n
    assert probe_prefetch.main([path, "--tokens", "2", "--top", "2", "--ahead", "2"]) == 0
    assert "| top-2, next layer |" in capsys.readouterr().out


def test_bench_variants_alternate_so_none_always_runs_first(tools_path):
    import bench_streaming
    order = bench_streaming.alternating(("", "transfer", "cancel"), 3)
    assert order == [("", 0), ("transfer", 0), ("cancel", 0),
                     ("cancel", 1), ("transfer", 1), ("", 1),
                     ("", 2), ("transfer", 2), ("cancel", 2)]
    assert bench_streaming.alternating(("",), 2) == [("", 0), ("", 1)]
    with pytest.raises(SystemExit):
        bench_streaming.main(["--compare", "transfer,bogus", "--parts", "A"])
