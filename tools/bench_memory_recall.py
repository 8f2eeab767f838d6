"""Fact recall with the hypervector memory: the probability a trained model gives a
value it never saw, with and without the memory's value injected (issue 25).

    python tools/bench_memory_recall.py --model-dir models/tiny [--facts 64] [--json OUT]

Constructed facts, absent from any corpus: key `qv<i>_<word>` (a made-up Python
name), value a made-up string; the prompt is how code would ask for it,
`<key> = "`, and the value's tokens follow. The memory (10,000-bit hypervectors,
2,000 banks, the model's own embedding as the codebook's input) holds all the
facts; it is queried with the prompt's tokens (the last `window`, as decoding
does). Per fact, teacher-forced on the streaming engine: the value tokens' mean
probability and log-probability without injection and with the recalled value's
vector injected after the middle layer at every position that predicts a value
token (scales 1–8), whether the first value token becomes the argmax, and whether
the recalled value is the fact's own (retrieval accuracy from the prompt). A
second table injects at other layers. First, the similarity threshold: the share of
facts whose prompt recalls the right value, and of unrelated contexts (lines of
standard-library source) that recall anything, at each `min_similarity`. Prints
markdown tables.
"""

from __future__ import annotations

import argparse
import inspect
import textwrap
import json
import time

import numpy as np

from perspective_jax.evaluate.memory import value_logprobs
from perspective_jax.infer.engine import StreamingEngine, load_model_tokenizer
from perspective_jax.infer.options import EngineOptions
from perspective_jax.infer.memory_codec import codec_for, engine_codec, new_memory_file
from perspective_jax.memory.recall import MemoryRecall, RecallConfig
from perspective_jax.memory.store import MemoryParams

SYLLABLES = ("ka", "zo", "ri", "mu", "te", "xa", "vo", "pli", "qua", "nes", "dru", "wy")


def facts(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    word = lambda k: "".join(rng.choice(SYLLABLES, size=k))     # noqa: E731
    return [(f"qv{i}_{word(2)}", f"{word(3)}_{word(2)}") for i in range(n)]


def score(engine, prompt_ids, value_ids, vector_of=None, layer=None):
    """(log p of each value token, whether the first is the argmax): the scorer of
    perspective-eval --memory (`evaluate.memory.value_logprobs`); the argmax from
    the first position's log-probability against every other token's."""
    lp = value_logprobs(engine, prompt_ids, value_ids, vector_of, layer)
    first = value_logprobs(engine, prompt_ids, value_ids[:1], vector_of, layer,
                           all_tokens=True)
    return lp, bool(first.argmax() == value_ids[0])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--facts", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scales", default="1,2,4,8")
    p.add_argument("--json", metavar="OUT")
    a = p.parse_args()
    engine = StreamingEngine(a.model_dir, EngineOptions(host_budget_mb=64, device_slots=4))
    tok = load_model_tokenizer(a.model_dir)
    cfg = engine.model
    n_layers = cfg.n_periods * len(cfg.layer_pattern)
    model = engine_codec(engine, tok)
    pairs = facts(a.facts, a.seed)
    mf = new_memory_file(model.codec, MemoryParams(seed=a.seed), model.identity,
                         model.vocab_size, sample=[t for kv in pairs for t in kv])
    codec = codec_for(mf, model.codec.tokenize, model.codec.embed_rows)
    mem = mf.memory
    t0 = time.perf_counter()
    for key, value in pairs:
        mem.add(codec.encode(key), codec.encode(value), key=key, value=value)
    add_us = 1e6 * (time.perf_counter() - t0) / len(pairs)
    recall = MemoryRecall(mf, codec, RecallConfig(min_similarity=0.5), n_layers)
    # unrelated contexts: lines of standard-library source (the corpus's kind of text)
    lines = [ln.strip() for ln in inspect.getsource(textwrap).splitlines() if len(ln.strip()) > 20]
    rng = np.random.default_rng(a.seed)
    unrelated = [lines[i] for i in rng.choice(len(lines), size=min(200, len(lines)),
                                              replace=False)]
    fact_sims, other_sims = [], []
    for key, value in pairs:
        got = recall(tok.encode(f'{key} = "').tolist())
        fact_sims.append(got.similarity if got is not None and got.value == value else 0.0)
    for text in unrelated:
        got = recall(tok.encode(text).tolist())
        other_sims.append(0.0 if got is None else got.similarity)
    scales = [float(s) for s in a.scales.split(",")]
    variants = [("mean", 4.0, None)] + [("next_token", sc, None) for sc in scales]
    layers = sorted({0, n_layers - 1} - {recall.inject_layer})
    variants += [("next_token", 4.0, layer) for layer in layers]
    res = {"base": [], "top_base": [], "found": 0, "sim": []}
    for v in variants:
        res[v], res[("top", v)] = [], []
    t0 = time.perf_counter()
    for key, value in pairs:
        prompt, val = tok.encode(f'{key} = "').tolist(), tok.encode(value).tolist()
        base, top = score(engine, prompt, val)
        res["base"].append(base)
        res["top_base"].append(top)
        got = recall(prompt)
        if got is not None:
            res["found"] += got.value == value
            res["sim"].append(got.similarity)
        for v in variants:
            mode, sc, layer = v
            r = MemoryRecall(mf, codec, RecallConfig(min_similarity=0.5, inject=mode,
                                                     inject_scale=sc, window=64), n_layers)
            lp, top = score(engine, prompt, val,
                            lambda ctx, r=r: (lambda g: None if g is None else g.vector)(
                                r(ctx)),
                            recall.inject_layer if layer is None else layer)
            res[v].append(lp)
            res[("top", v)].append(top)
    wall = time.perf_counter() - t0
    engine.close()

    def row(name, lps, tops=None):
        cat = np.concatenate(lps)
        first = np.mean([lp[0] for lp in lps])
        return (f"| {name} | {np.exp(cat).mean():.4f} | {cat.mean():.3f} | "
                f"{np.exp(first):.4f} | "
                + (f"{100 * np.mean(tops):.0f} % |" if tops is not None else "– |"))
    print("| min_similarity | facts recalled (right value) | unrelated contexts with a hit |")
    print("|---|---|---|")
    for th in (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8):
        print(f"| {th:.2f} | {100 * np.mean(np.asarray(fact_sims) >= th):.0f} % | "
              f"{100 * np.mean(np.asarray(other_sims) >= th):.0f} % |")
    print()
    print(f"{len(pairs)} facts; recalled value is the fact's own: {res['found']}/{len(pairs)} "
          f"(mean similarity {np.mean(res['sim']) if res['sim'] else float('nan'):.3f}); "
          f"inject layer {recall.inject_layer} of 0..{n_layers - 1}; insert {add_us:.0f} µs "
          f"(encode + add); {wall:.0f} s\n")
    print("| injection | mean p(value token) | mean log p | p(first value token) | "
          "first token argmax |")
    print("|---|---|---|---|---|")
    print(row("none", res["base"], res["top_base"]))
    for v in variants:
        mode, sc, layer = v
        where = recall.inject_layer if layer is None else layer
        print(row(f"{mode}, scale {sc:g}, after layer {where}", res[v], res[("top", v)]))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({str(k): ([np.asarray(x).tolist() for x in v] if isinstance(v, list)
                                else v) for k, v in res.items()}, fh)


if __name__ == "__main__":
    main()
