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
second table injects at other layers. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax.numpy as jnp
import numpy as np

from perspective_jax.infer import compute
from perspective_jax.infer.engine import StreamingEngine, load_model_tokenizer
from perspective_jax.infer.options import EngineOptions
from perspective_jax.memory.codebook import Codebook
from perspective_jax.memory.memory_file import MemoryFile
from perspective_jax.memory.recall import (MemoryRecall, RecallConfig, TextCodec,
                                           vocabulary_centre)
from perspective_jax.memory.store import HDMemory, MemoryParams
from perspective_jax.model.extensions import Extensions

SYLLABLES = ("ka", "zo", "ri", "mu", "te", "xa", "vo", "pli", "qua", "nes", "dru", "wy")


def facts(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    word = lambda k: "".join(rng.choice(SYLLABLES, size=k))     # noqa: E731
    return [(f"qv{i}_{word(2)}", f"{word(3)}_{word(2)}") for i in range(n)]


def score(engine, prompt_ids, value_ids, vector=None, layer=None):
    """log p of each value token given the prompt (and the value tokens before it),
    with `vector` injected after `layer` at every position predicting one."""
    ext = None if vector is None else Extensions(inject_layer=layer,
                                                 inject=np.asarray(vector)[None])
    state = engine.new_state()
    logits, state = engine.forward(np.asarray(prompt_ids[:-1], np.int32), state)
    out, first_top = [], None
    feed = [prompt_ids[-1], *value_ids[:-1]]
    for tok, want in zip(feed, value_ids):
        logits, state = engine.forward(np.asarray([tok], np.int32), state, ext)
        z = np.asarray(logits, np.float64)
        lp = z - z.max() - math.log(np.exp(z - z.max()).sum())
        out.append(float(lp[want]))
        if first_top is None:
            first_top = int(np.argmax(z)) == want
    return np.asarray(out), first_top


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
    rows = lambda ids: np.asarray(compute.embed(cfg, engine.embed_table,   # noqa: E731
                                                jnp.asarray(ids, jnp.int32)[None]))[0]
    params = MemoryParams(seed=a.seed)
    centre = vocabulary_centre(rows, tok.vocab_size)
    codec = TextCodec(lambda t: tok.encode(t), rows,
                      Codebook(cfg.d_model, params.dim, params.seed, centre))
    mem = HDMemory.new(params)
    pairs = facts(a.facts, a.seed)
    t0 = time.perf_counter()
    for key, value in pairs:
        mem.add(codec.encode(key), codec.encode(value), key=key, value=value)
    add_us = 1e6 * (time.perf_counter() - t0) / len(pairs)
    recall = MemoryRecall(MemoryFile(mem, centre, None), codec, RecallConfig(), n_layers)
    scales = [float(s) for s in a.scales.split(",")]
    layers = sorted({recall.inject_layer, 0, n_layers - 2})
    res = {"base": [], "top_base": [], "found": 0, "sim": []}
    for s in scales:
        res[f"s{s}"], res[f"top{s}"] = [], []
    for layer in layers:
        res[f"l{layer}"] = []
    t0 = time.perf_counter()
    for key, value in pairs:
        prompt, val = tok.encode(f'{key} = "').tolist(), tok.encode(value).tolist()
        base, top = score(engine, prompt, val)
        res["base"].append(base)
        res["top_base"].append(top)
        got = recall(prompt)
        if got is None:
            for s in scales:
                res[f"s{s}"].append(base)
                res[f"top{s}"].append(top)
            for layer in layers:
                res[f"l{layer}"].append(base)
            continue
        res["found"] += got.value == value
        res["sim"].append(got.similarity)
        unit = got.vector / recall.cfg.inject_scale
        for s in scales:
            lp, top = score(engine, prompt, val, s * unit, recall.inject_layer)
            res[f"s{s}"].append(lp)
            res[f"top{s}"].append(top)
        for layer in layers:
            res[f"l{layer}"].append(score(engine, prompt, val, 4 * unit, layer)[0])
    wall = time.perf_counter() - t0
    engine.close()

    def row(name, lps, tops=None):
        cat = np.concatenate(lps)
        first = np.mean([lp[0] for lp in lps])
        return (f"| {name} | {np.exp(cat).mean():.4f} | {cat.mean():.3f} | "
                f"{np.exp(first):.4f} | "
                + (f"{100 * np.mean(tops):.0f} % |" if tops is not None else "– |"))
    print(f"{len(pairs)} facts; recalled value is the fact's own: {res['found']}/{len(pairs)} "
          f"(mean similarity {np.mean(res['sim']) if res['sim'] else float('nan'):.3f}); "
          f"inject layer {recall.inject_layer} of 0..{n_layers - 1}; insert {add_us:.0f} µs "
          f"(encode + add); {wall:.0f} s\n")
    print("| injection | mean p(value token) | mean log p | p(first value token) | "
          "first token argmax |")
    print("|---|---|---|---|---|")
    print(row("none", res["base"], res["top_base"]))
    for s in scales:
        print(row(f"scale {s:g}, layer {recall.inject_layer}", res[f"s{s}"], res[f"top{s}"]))
    print("\n| injection (scale 4) | mean p(value token) | mean log p | p(first value token) | "
          "first token argmax |")
    print("|---|---|---|---|---|")
    for layer in layers:
        print(row(f"after layer {layer}", res[f"l{layer}"]))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({k: ([np.asarray(x).tolist() for x in v] if isinstance(v, list) else v)
                       for k, v in res.items()}, fh)


if __name__ == "__main__":
    main()
