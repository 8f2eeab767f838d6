"""What Multi-Perspective Decoding costs, per way of keeping the views' state (issue 20).

Decodes greedily from an exported model directory and prints tokens per second:

* streaming engine — plain; MPD with views forked from P0's state (as
  perspective-infer --mpd runs it) at the default budget, at 0.15 and uncapped; MPD with
  persistent per-perspective states (all four perspectives as one batched engine
  step of 4 rows every token: what keeping SPEC's per-perspective states costs);
* with --run-dir (the run the model directory was exported from): the same in
  memory (`model.generate.generate_mpd`, ternary expert values), one sequence.

The first round compiles; the reported number is the best of --rounds later ones.

    .venv/bin/python tools/bench_mpd.py --model-dir models/tiny [--run-dir runs/quickstart]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from perspective_jax.config.schema import MPDConfig
from perspective_jax.infer.engine import StreamingEngine, load_model_tokenizer
from perspective_jax.infer.options import EngineOptions
from perspective_jax.infer.session import Conversation
from perspective_jax.model.extensions import Extensions, RowRoutes
from perspective_jax.model.mpd import PERSPECTIVES, mpd_step
from perspective_jax.model.sampling import Sampling

GREEDY = Sampling(temperature=0)


def streamed(engine, tokenizer, prompt: str, n: int, mpd) -> tuple[float, float]:
    """(tok/s from first to last token, trigger rate) of one Conversation."""
    conv = Conversation(engine, tokenizer, GREEDY, mpd=mpd)
    stamps, fired = [], []
    conv.generate(prompt, n, on_token=lambda i: (stamps.append(time.perf_counter()),
                                                 fired.append(i.triggered)))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), float(np.mean(fired))


def streamed_persistent(engine, ids: np.ndarray, n: int, mpd: MPDConfig) -> tuple[float, float]:
    """Persistent states on the engine: the four perspectives' states advance as one
    batched step every token; MPD's rule decides from their logits."""
    ext = Extensions(route=RowRoutes(PERSPECTIVES))
    states, logits = [], []
    for policy in PERSPECTIVES:
        lg, st = engine.forward(ids, engine.new_state(), Extensions(route=policy))
        states.append(st)
        logits.append(lg)
    logits = np.stack(logits)
    spent, fired, stamps = 0, [], []
    for i in range(n):
        tok = int(np.argmax(logits[0]))
        s = mpd_step(logits[:1], [tok], [i], mpd, lambda: logits[1:, None], [spent])
        spent += int(s.triggered[0])
        fired.append(bool(s.triggered[0]))
        stamps.append(time.perf_counter())
        logits, states = engine.step(states, [int(s.token[0])] * 4, ext)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), float(np.mean(fired))


def in_memory(run_dir: str, ids: np.ndarray, n: int, mpds: dict, rounds: int) -> dict:
    import jax

    from perspective_jax.export.exporter import resolve_run, with_ternary_experts
    from perspective_jax.model.generate import generate, generate_mpd
    from perspective_jax.model.transformer import abstract_params
    from perspective_jax.rundir.checkpoint import restore_params
    from perspective_jax.rundir.layout import load_run_config
    run = resolve_run(run_dir, log=lambda *_: None)
    cfg = load_run_config(run)
    params = restore_params(run, abstract_params(cfg.model, cfg.moe), source="--run-dir")
    params = with_ternary_experts(jax.tree.map(np.asarray, params), cfg)
    bits = cfg.ternary.activation_bits if cfg.ternary.enabled else 0
    prompt = ids[None]
    out = {}
    runs = {"plain": lambda: generate(cfg.model, params, prompt, n, GREEDY, moe=cfg.moe,
                                      activation_bits=bits)}
    for name, mpd in mpds.items():
        runs[name] = (lambda m=mpd: generate_mpd(cfg.model, params, prompt, n, m, GREEDY,
                                                 moe=cfg.moe, activation_bits=bits))
    for name, fn in runs.items():
        jax.block_until_ready(fn())
        best = min(_timed(fn) for _ in range(rounds))
        out[name] = n / best
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--prompt", default="def load_config(path):")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device-slots", type=int, default=2)
    p.add_argument("--run-dir", help="the run the model was exported from (in-memory arms)")
    a = p.parse_args(argv)
    default = MPDConfig()
    uncapped = dataclasses.replace(default, max_rate=1.0)
    rate15 = dataclasses.replace(default, max_rate=0.15)
    engine = StreamingEngine(a.model_dir, EngineOptions(host_budget_mb=256,
                                                        device_slots=a.device_slots))
    tokenizer = load_model_tokenizer(a.model_dir, engine.manifest)
    ids = np.asarray(tokenizer.encode(a.prompt), np.int32)
    arms = {"plain": lambda: streamed(engine, tokenizer, a.prompt, a.tokens, None),
            f"forked, max_rate {default.max_rate:g} (default)":
                lambda: streamed(engine, tokenizer, a.prompt, a.tokens, default),
            "forked, max_rate 0.15": lambda: streamed(engine, tokenizer, a.prompt, a.tokens,
                                                      rate15),
            "forked, uncapped": lambda: streamed(engine, tokenizer, a.prompt, a.tokens,
                                                 uncapped),
            "persistent (4 rows every token)":
                lambda: streamed_persistent(engine, ids, a.tokens, default)}
    rows = {}
    for rnd in range(a.rounds + 1):              # round 0 compiles; rounds interleave arms
        for name, fn in arms.items():
            rate, trig = fn()
            if rnd:
                rows[name] = max(rows.get(name, (0, 0)), (rate, trig))
    engine.close()
    base = rows["plain"][0]
    print(f"streaming engine ({a.model_dir}, {a.device_slots} device slots, greedy, "
          f"{a.tokens} tokens, best of {a.rounds})")
    print("| arm | tok/s | vs plain | MPD trigger rate |\n|---|---:|---:|---:|")
    for name, (rate, trig) in rows.items():
        print(f"| {name} | {rate:.1f} | {rate / base:.2f} | {trig:.2f} |")
    if a.run_dir:
        mem = in_memory(a.run_dir, ids, a.tokens,
                        {f"forked, max_rate {default.max_rate:g} (default)": default,
                         "forked, uncapped": uncapped,
                         "persistent": dataclasses.replace(default, state="persistent")},
                        a.rounds)
        print("\nin memory (generate / generate_mpd, one sequence, incl. sampling)")
        print("| arm | tok/s | vs plain |\n|---|---:|---:|")
        for name, rate in mem.items():
            print(f"| {name} | {rate:.1f} | {rate / mem['plain']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
