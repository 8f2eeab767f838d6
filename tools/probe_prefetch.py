"""How well can a streamed decode guess its next experts? (prefetch design probe)

Decodes text with the streaming engine and, at every expert layer j of every
decode token, records what a prefetcher could have known after layer j routed:

  * top-k: is layer j+1's actual expert among the k most probable experts of
    layer j+1's router applied to layer j's hidden state? (k = 1 is the engine's
    `router` guess; k = 2 is what a two-candidate prefetch would read)
  * ahead-d: is layer j+d's actual expert the top-1 of layer j+d's router applied
    to layer j's hidden state? (d = 2, 3: reading further ahead than one layer)

    python tools/probe_prefetch.py MODEL_DIR [--tokens 40] [--text FILE] [--top 4]

Prints one table; chance is 1 / experts per layer.
"""

from __future__ import annotations

import argparse
import sys

from perspective_jax.cli.allocator import ensure_fast_allocator  # noqa: E402

if __name__ == "__main__":
    ensure_fast_allocator()         # before JAX starts (cli/allocator.py)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from perspective_jax.infer import compute as L  # noqa: E402
from perspective_jax.infer.engine import StreamingEngine  # noqa: E402
from perspective_jax.infer.options import EngineOptions  # noqa: E402
from perspective_jax.model.extensions import NEAREST  # noqa: E402
from perspective_jax.model.routed_ffn import TorusRouter  # noqa: E402

TEXT = b"It was the best of times, it was the worst of times, it was the age of wisdom. "
PROMPT = 16


def probe(engine: StreamingEngine, tokens: np.ndarray, top: int, ahead: int) -> dict:
    """{"top-k": (right, n), "ahead-d": (right, n)} over the decode steps of `tokens`."""
    n_layers = len(engine.expert_layers)
    model, moe = engine.model, engine.moe

    @jax.jit
    def router_probs(lp, h):
        hn = L.route(model, moe, NEAREST, 0, lp, h, None, 0)[0]       # RMSNorm(h)
        return TorusRouter(model, moe).apply({"params": lp["ffn"]["router"]}, hn)[3]

    step, actual, ranked = [0], {}, {}
    predict, observe = engine._predict_next, engine._observe

    def spy_predict(j, h, router_guess):
        for d in range(1, ahead + 1):
            if j + d < n_layers:
                p, i = engine.expert_layers[j + d]
                probs = np.asarray(router_probs(engine.layer_params[p][i], h)).reshape(-1)
                ranked[(step[0], j, d)] = np.argsort(-probs)[:top]
        return predict(j, h, router_guess)

    def spy_observe(j, expert):
        actual[(step[0], j)] = expert
        observe(j, expert)

    engine._predict_next, engine._observe = spy_predict, spy_observe
    state = engine.new_state()
    _, state = engine.forward(tokens[:PROMPT], state)
    for t in tokens[PROMPT:]:
        step[0] += 1
        _, state = engine.forward(np.asarray([t]), state)
    out = {}
    for k in range(1, top + 1):
        hits = [actual[(s, j + 1)] in r[:k] for (s, j, d), r in ranked.items() if d == 1]
        out[f"top-{k}, next layer"] = (sum(hits), len(hits))
    for d in range(2, ahead + 1):
        hits = [actual[(s, j + d)] == r[0] for (s, j, dd), r in ranked.items() if dd == d]
        out[f"top-1, {d} layers ahead"] = (sum(hits), len(hits))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--tokens", type=int, default=40, help="decode tokens")
    p.add_argument("--text", help="text file to decode (default: a built-in sentence)")
    p.add_argument("--top", type=int, default=4, help="largest k of top-k")
    p.add_argument("--ahead", type=int, default=3, help="largest layer distance d")
    p.add_argument("--host-mb", type=float, default=1024)
    a = p.parse_args(argv)
    if a.tokens < 1 or a.top < 1 or a.ahead < 1:
        p.error("--tokens, --top and --ahead must be at least 1")
    try:
        raw = open(a.text, "rb").read() if a.text else TEXT * 64
    except OSError as e:
        p.error(f"--text: {e}")
    engine = StreamingEngine(a.model_dir, EngineOptions(host_budget_mb=a.host_mb))
    if not engine.routed:
        p.error(f"{a.model_dir} has no routed experts to guess")
    need = PROMPT + a.tokens
    raw = (raw * (need // max(len(raw), 1) + 1))[:need]
    tokens = np.frombuffer(raw, np.uint8).astype(np.int32) % engine.model.vocab_size
    try:
        result = probe(engine, tokens, a.top, a.ahead)
    finally:
        engine.close()
    experts = engine.moe.num_experts
    print(f"| guess ({a.tokens} decode tokens; chance {100 / experts:.1f} %) | right | of |")
    print("|---|---:|---:|")
    for name, (right, n) in result.items():
        print(f"| {name} | {100 * right / max(n, 1):.1f} % | {n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
