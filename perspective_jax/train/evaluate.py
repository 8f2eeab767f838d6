"""Validation loss, bits per token/char, routing report and a text sample.

    record = evaluate(run, state, step)   # {"val_loss", "val_bits_per_token", ...}

val_loss = Σ NLL / Σ tokens over the fixed validation windows (`run.val_windows`),
computed with the weights the model uses at `state["step"]` (ternary where that
applies); bits/char = val_loss / ln 2 / (characters per token of the split).
"""

from __future__ import annotations

import math

import jax
import numpy as np

from perspective_jax.model.generate import generate
from perspective_jax.model.sampling import Sampling
from perspective_jax.moe.metrics import routing_report
from perspective_jax.train import sharding as shd
from perspective_jax.train.objective import expert_activation_bits

SAMPLE_PROMPT_TOKENS = 16
SAMPLE_NEW_TOKENS = 48


def sample_text(run, params_used, step: int) -> str:
    """The first SAMPLE_PROMPT_TOKENS validation tokens continued by
    SAMPLE_NEW_TOKENS sampled ones (temperature 0.8, top-k 40, seed = step), never an
    id the tokenizer does not have (it may have fewer pieces than model.vocab_size)."""
    cfg = run.cfg
    prompt = np.asarray(run.val_split.tokens[:SAMPLE_PROMPT_TOKENS], np.int32)[None]
    out = generate(cfg.model, params_used, prompt, SAMPLE_NEW_TOKENS,
                   Sampling(temperature=0.8, top_k=40), seed=step, moe=cfg.moe,
                   activation_bits=expert_activation_bits(cfg),
                   n_valid=run.tokenizer.vocab_size)
    return run.tokenizer.decode(np.concatenate([prompt[0], out[0]]))


def evaluate(run, state: dict, step: int) -> dict:
    """The eval record of `state` at `step` (a `TrainSetup` `run` supplies the
    jitted steps, validation windows, mesh and tokenizer). Routed models add
    the routing report (flattened, plus its full form under "routing")."""
    total, count, stats = 0.0, 0.0, None
    params_used = run.used_params(state["params"], state["step"])
    for w in run.val_windows:
        w = jax.make_array_from_callback(w.shape, shd.batch_sharding(run.mesh),
                                         lambda idx, w=w: w[idx])
        s, c, st = run.eval_step(params_used, w)
        total, count = total + float(s), count + float(c)
        st = jax.tree.map(np.asarray, st)
        stats = st if stats is None else jax.tree.map(np.add, stats, st)
    loss = total / count
    record = {"val_loss": loss, "val_bits_per_token": loss / math.log(2),
              "val_bits_per_char": loss / math.log(2) / run.val_split.chars_per_token,
              "sample": sample_text(run, params_used, step)}
    if stats:
        routing = routing_report(stats["counts"], stats["switches"],
                                 stats["entropy"] / len(run.val_windows))
        for name in ("layer", "token"):          # expert-predictor heads: right / guesses
            right, n = stats[f"predict_{name}"]
            routing[f"predictor_accuracy_{name}"] = float(right / n) if n else 0.0
        record.update({k: v for k, v in routing.items() if k != "utilisation"})
        record["routing"] = routing
    return record
