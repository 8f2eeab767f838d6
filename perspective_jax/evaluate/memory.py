"""What the hypervector memory does for a model (`perspective-eval --memory FILE`,
SPEC §3.7): the `memory.*` metrics.

    values = measure(engine, tokenizer, "facts.hdm", RecallConfig(), contexts, n=64)

For up to `n` stored entries (key text k, value text v; the memory's own):

* memory.recall_accuracy — the share whose key, as a query, recalls its own value
  (at the recall threshold);
* memory.false_hit_rate — the share of unrelated contexts (windows of the held-out
  --data text) that recall anything;
* memory.value_prob / memory.value_prob_injected — the mean probability of v's
  tokens after k's tokens, teacher-forced on the streaming engine, without and with
  the memory consulted at every position predicting a value token (the vector
  `MemoryRecall` returns for the text so far, injected after its layer);
  memory.value_prob_gain their ratio;
* memory.query_us — µs per recall (encode the context, query, build the vector).

`value_logprobs` is the teacher-forced scorer (also used by
tools/bench_memory_recall.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional

import numpy as np

from perspective_jax.errors import UserError
from perspective_jax.infer.memory_codec import engine_recall
from perspective_jax.memory.recall import RecallConfig
from perspective_jax.model.extensions import Extensions

@dataclasses.dataclass(frozen=True)
class MemoryEvalOptions:
    """The memory file, how decoding consults it, the stored entries scored (at most
    `entries`) and the unrelated held-out contexts queried (`contexts`)."""

    path: str
    recall: RecallConfig = RecallConfig()
    entries: int = 64
    contexts: int = 64

    def __post_init__(self):
        if self.entries < 1 or self.contexts < 1:
            raise UserError("memory entries and contexts must each be >= 1")


def value_logprobs(engine, prompt_ids, value_ids, vector_of: Optional[Callable] = None,
                   layer: Optional[int] = None, all_tokens: bool = False) -> np.ndarray:
    """log p of each value token given the prompt and the value tokens before it,
    on the streaming engine; `vector_of(context ids)` → the vector injected after
    `layer` at the position predicting the next token (None there: none).
    `all_tokens`: every token's log p at each position instead, [len(value), V]."""
    state = engine.new_state()
    if len(prompt_ids) > 1:
        _, state = engine.forward(np.asarray(prompt_ids[:-1], np.int32), state)
    out, context = [], [int(t) for t in prompt_ids]
    for want in value_ids:
        vec = None if vector_of is None else vector_of(context)
        ext = None if vec is None else Extensions(inject_layer=layer,
                                                  inject=np.asarray(vec)[None])
        logits, state = engine.forward(np.asarray(context[-1:], np.int32), state, ext)
        z = np.asarray(logits, np.float64)
        lp = z - z.max() - math.log(np.exp(z - z.max()).sum())
        out.append(lp if all_tokens else float(lp[want]))
        context.append(int(want))
    return np.asarray(out)


def measure(engine, tokenizer, path: str, cfg: RecallConfig, contexts: list,
            n: int = 64, log: Callable[[str], None] = lambda _: None) -> dict:
    """The memory.* metrics (module docstring); `contexts`: lists of held-out ids."""
    recall = engine_recall(engine, tokenizer, path, cfg)
    entries = [(k, v) for k, v in recall.file.memory.texts if k and v][:n]
    if not entries:
        raise UserError(f"memory {path} holds no key and value texts to evaluate")
    log(f"memory: {len(entries)} entries, {len(contexts)} unrelated contexts")
    found, base, injected, spent, calls = 0, [], [], 0.0, 0

    def vector_of(ctx):
        nonlocal spent, calls
        t0 = time.perf_counter()
        got = recall(ctx)
        spent, calls = spent + time.perf_counter() - t0, calls + 1
        return None if got is None else got.vector
    for key, value in entries:
        k_ids = [int(t) for t in tokenizer.encode(key)]
        v_ids = [int(t) for t in tokenizer.encode(value)]
        if not k_ids or not v_ids:
            continue
        vector_of(k_ids)
        found += recall.last is not None and recall.last.value == value
        base.append(value_logprobs(engine, k_ids, v_ids))
        injected.append(value_logprobs(engine, k_ids, v_ids, vector_of, recall.inject_layer))
    false_hits = sum(vector_of(ctx) is not None for ctx in contexts)
    p0 = float(np.exp(np.concatenate(base)).mean())
    p1 = float(np.exp(np.concatenate(injected)).mean())
    return {"memory.recall_accuracy": found / len(base),
            "memory.false_hit_rate": false_hits / len(contexts) if contexts else float("nan"),
            "memory.value_prob": p0, "memory.value_prob_injected": p1,
            "memory.value_prob_gain": p1 / p0 if p0 > 0 else float("nan"),
            "memory.query_us": 1e6 * spent / max(calls, 1)}
