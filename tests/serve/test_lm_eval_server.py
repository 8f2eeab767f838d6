"""lm-evaluation-harness against a live perspective-serve: its `local-completions`
model (log-likelihoods through /v1/completions with echo + logprobs, the remote
tokenizer through /tokenizer_info and /tokenize) scores the repository's perplexity
task to the bits per byte the engine's own logits give."""

import math
import os

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from perspective_jax.data.byte_tokenizer import ByteTokenizer  # noqa: E402
from perspective_jax.infer.engine import StreamingEngine  # noqa: E402
from perspective_jax.infer.options import EngineOptions  # noqa: E402
from serve_helpers import MODEL  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "examples", "lm_eval")
PARAGRAPHS = ["To be, or not to", "be, that is the ", "question: whethe"]


def test_local_completions_scores_the_perplexity_task(served, tmp_path, monkeypatch):
    import datasets
    from lm_eval.tasks import TaskManager
    server, path = served
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    (tmp_path / "held_out.txt").write_text("\n\n".join(PARAGRAPHS))
    monkeypatch.chdir(tmp_path)
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=(f"base_url={server.url}/v1/completions,model={MODEL},"
                    "tokenizer_backend=remote,num_concurrent=1,max_retries=1"),
        tasks=["perspective_perplexity"], bootstrap_iters=0, log_samples=False,
        task_manager=TaskManager(include_path=EXAMPLES, include_defaults=False))
    got = out["results"]["perspective_perplexity"]
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1))
    total = 0.0
    for text in PARAGRAPHS:                     # EOS, then every byte predicted once
        doc = list(text.encode())
        logits, _ = engine.forward(np.asarray([ByteTokenizer.EOS] + doc[:-1]),
                                   engine.new_state(), all_logits=True)
        z = logits.astype(np.float64)
        lp = z - z.max(1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(1, keepdims=True))
        total += lp[np.arange(len(doc)), doc].sum()
    engine.close()
    n_bytes = sum(len(p.encode()) for p in PARAGRAPHS)
    assert got["bits_per_byte,none"] == pytest.approx(-total / n_bytes / math.log(2),
                                                      rel=1e-5)
