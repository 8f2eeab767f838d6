"""What one streamed forward-gradient update needs on the device at a config's full
size, from XLA's memory analysis of the walk's own compiled calls (abstract shapes:
nothing is allocated), against the decode plan's headroom (perspective-budget).

    python tools/compile_adapt_plan.py --config curricula/perspective-1t.yaml \
        [--seq-len 128] [--directions 8] [--rank 4]

Per layer kind: temporaries of the block's "mix" part with the adapter and K tangents
(`infer.tangent_walk._mix`), and its output (h and the K tangents); the head pass
(HEAD_ROWS tokens, K tangent logits). One window per pass (rows_per_pass = 1).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from perspective_jax.config.loader import load_config
from perspective_jax.infer import tangent_walk as W
from perspective_jax.model.transformer import abstract_params

MiB = 1 << 20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--directions", type=int, default=8)
    p.add_argument("--rank", type=int, default=4)
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    m, t, k, r = cfg.model, args.seq_len, args.directions, args.rank
    shapes = abstract_params(m, cfg.moe)
    sds = jax.ShapeDtypeStruct
    x, tx = sds((1, t, m.d_model), jnp.float32), sds((k, 1, t, m.d_model), jnp.float32)
    pos = sds((1, t), jnp.int32)
    print(f"| part | temporaries MiB | outputs MiB |\n|---|---:|---:|")
    seen = set()
    for i, kind in enumerate(m.layer_pattern):
        if kind in seen:
            continue
        seen.add(kind)
        lp = {name: jax.tree.map(lambda a: sds(a.shape[1:], a.dtype), sub)
              for name, sub in shapes["periods"][f"layer_{i}"].items() if name != "ffn"}
        a = ta = None
        if kind == "pdr":
            a = {"w_p": {"a": sds((m.d_model, r), jnp.float32),
                         "b": sds((r, m.d_model), jnp.float32)}}
            ta = jax.tree.map(lambda s: sds((k, *s.shape), s.dtype), a)
        stats = W._mix.lower(m, kind, 1.0, lp, x, pos, a, tx, ta).compile().memory_analysis()
        print(f"| {kind} mixer, {k} tangents | {stats.temp_size_in_bytes / MiB:,.1f} | "
              f"{stats.output_size_in_bytes / MiB:,.1f} |")
    rows = W.HEAD_ROWS
    table = sds((m.vocab_size, m.d_model), jnp.float32)
    norm = jax.tree.map(lambda a: sds(a.shape, a.dtype), shapes["final_norm"])
    stats = W._head_loss.lower(m, norm, table, sds((rows, m.d_model), jnp.float32),
                               sds((k, rows, m.d_model), jnp.float32),
                               sds((rows,), jnp.int32)).compile().memory_analysis()
    print(f"| head + loss, {rows} tokens, {k} tangents | "
          f"{stats.temp_size_in_bytes / MiB:,.1f} | {stats.output_size_in_bytes / MiB:,.1f} |")
    print(f"\nx and its {k} tangents between layers: {(k + 1) * t * m.d_model * 4 / MiB:,.1f} MiB")


if __name__ == "__main__":
    main()
