"""Where a streamed decode step spends its time, piece by piece (compute only).

Every expert the window needs stays in its own device slot (no transfers), the
tokens are decoded twice, and the second pass is repeated with each jitted
piece of `perspective_jax.infer.compute` synchronised on its own:

    python tools/profile_decode.py MODEL_DIR [--tokens 24] [--prompt 16]

Prints ms per token and per call of: embed, PDR / GQA mixers, routing, the
fused expert call, dense FFNs, the head; and the unsynchronised step time.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

from perspective_jax.cli.allocator import ensure_fast_allocator  # noqa: E402

if __name__ == "__main__":
    ensure_fast_allocator()         # before JAX starts (cli/allocator.py)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from perspective_jax.infer import compute as L  # noqa: E402
from perspective_jax.modeldir.manifest import read_manifest  # noqa: E402
from perspective_jax.infer.engine import StreamingEngine  # noqa: E402
from perspective_jax.infer.options import EngineOptions  # noqa: E402

PIECES = ("embed", "mixer", "route", "expert_token", "dense_ffn", "head")
TEXT = b"It was the best of times, it was the worst of times, it was the age of wisdom. "


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--host-mb", type=float, default=4096)
    a = p.parse_args(argv)
    if a.tokens < 1 or a.prompt < 2:
        p.error("--tokens must be ≥ 1 and --prompt ≥ 2 (a prompt of one token is a decode step)")
    # one device slot per expert the window can touch: after the first pass every
    # transfer is "same" (the report line shows it), so only compute is timed
    layers = len(read_manifest(a.model_dir)["experts"]["layers"])
    eng = StreamingEngine(a.model_dir, EngineOptions(
        host_budget_mb=a.host_mb, device_slots=layers * (a.prompt + a.tokens) + 2, prefetch=False))
    repeats = -(-(a.prompt + a.tokens) // len(TEXT))
    toks = np.frombuffer(TEXT * repeats, np.uint8).astype(np.int32) % eng.model.vocab_size

    counting = [False]                                # only decode steps are profiled

    def window() -> float:
        state = eng.new_state()
        _, state = eng.forward(toks[:a.prompt], state)
        counting[0] = True
        t0 = time.perf_counter()
        for t in toks[a.prompt: a.prompt + a.tokens]:
            logits, state = eng.forward(np.asarray([t]), state)
        np.asarray(logits)
        counting[0] = False
        return (time.perf_counter() - t0) / a.tokens * 1e3

    try:
        window()                                          # compiles, brings the experts in
        full_before = eng.report()["transfers"]["full"]
        step_ms = window()
        spent, calls = collections.Counter(), collections.Counter()
        original = {name: getattr(L, name) for name in PIECES}

        def synced(name):
            def run(*args, **kw):
                t0 = time.perf_counter()
                out = jax.block_until_ready(original[name](*args, **kw))
                if counting[0]:
                    key = f"{name}:{args[1]}" if name == "mixer" else name
                    spent[key] += time.perf_counter() - t0
                    calls[key] += 1
                return out
            return run

        for name in PIECES:
            setattr(L, name, synced(name))
        try:
            synced_ms = window()
        finally:
            for name in PIECES:
                setattr(L, name, original[name])
        moved = eng.report()["transfers"]["full"] - full_before
        print(f"{a.model_dir}: decode step {step_ms:.1f} ms/token "
              f"({synced_ms:.1f} with every piece synchronised); full transfers in the timed "
              f"windows: {moved}{'' if moved == 0 else ' — not compute-only, raise --host-mb'}")
        print("| piece | ms / token | ms / call | calls / token |\n|---|---:|---:|---:|")
        for key in sorted(spent, key=spent.get, reverse=True):
            print(f"| {key} | {spent[key] / a.tokens * 1e3:.2f} | "
                  f"{spent[key] / calls[key] * 1e3:.3f} | {calls[key] / a.tokens:.1f} |")
    finally:
        eng.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
