"""`perspective-info`: parameter census of a config, and a forward smoke pass.

    perspective-info --config curricula/perspective-1t.yaml [--json]
    perspective-info --config curricula/tiny.yaml --forward-text README.md
"""

from __future__ import annotations

import json
import math
import os
import time

from perspective_jax.cli.common import (OneLineParser, add_config_args, cli_entry,
                                         exit_with, int_in)
from perspective_jax.config import load_config
from perspective_jax.errors import UserError


def forward_on_text(cfg, path: str, seq_len: int) -> dict:
    """Loss of a freshly initialised model on byte-tokenised text (sanity check:
    ≈ ln(vocab) nats per token at init)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from perspective_jax.data.byte_tokenizer import ByteTokenizer
    from perspective_jax.model.transformer import PerspectiveLM, init_params

    tok = ByteTokenizer()
    if cfg.model.vocab_size < tok.vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the byte "
                        f"tokenizer's {tok.vocab_size}; raise it for --forward-text")
    if not os.path.isfile(path):
        raise UserError(f"--forward-text: file not found: {path}")
    with open(path, encoding="utf-8", errors="replace") as fh:
        ids = tok.encode(fh.read())
    if len(ids) < seq_len + 1:
        raise UserError(f"--forward-text: {path} has {len(ids)} bytes; need at least "
                        f"{seq_len + 1} for one sequence (lower --seq-len)")
    batch = np.stack([ids[:seq_len], ids[1:seq_len + 1]])[None]  # [1, 2, T]
    inputs, targets = jnp.asarray(batch[:, 0]), jnp.asarray(batch[:, 1])
    params = init_params(cfg.model, jax.random.key(cfg.train.seed))
    model = PerspectiveLM(cfg.model)

    @jax.jit
    def loss_fn(p, x, y):
        logits, _ = model.apply({"params": p}, x)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1))

    t0 = time.perf_counter()
    loss = float(loss_fn(params, inputs, targets))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    loss = float(loss_fn(params, inputs, targets))
    run_s = time.perf_counter() - t0
    return {"file": path, "tokens": seq_len, "loss_nats": loss,
            "bits_per_byte": loss / math.log(2), "uniform_nats": math.log(cfg.model.vocab_size),
            "first_call_s": compile_s, "tokens_per_s": seq_len / run_s}


@cli_entry
def run(argv=None) -> int:
    parser = OneLineParser(prog="perspective-info", description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--forward-text", metavar="FILE",
                        help="also run a forward pass of the freshly initialised model on FILE")
    parser.add_argument("--seq-len", type=int_in(1, 2**20), default=256,
                        help="tokens for --forward-text (default 256)")
    args = parser.parse_intermixed_args(argv)  # overrides may follow flags
    cfg = load_config(args.config, args.overrides)

    from perspective_jax.model.census import format_table, summary

    result = {"name": cfg.name, "census": summary(cfg.model, cfg.moe)}
    if args.forward_text:
        result["forward"] = forward_on_text(cfg, args.forward_text, args.seq_len)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(format_table(cfg.model, title=f"== {cfg.name} ({args.config or 'defaults'}) ==",
                       moe=cfg.moe))
    if "forward" in result:
        f = result["forward"]
        print(f"forward on {f['file']} ({f['tokens']} byte tokens, fresh init): "
              f"loss {f['loss_nats']:.3f} nats (uniform {f['uniform_nats']:.3f}), "
              f"{f['bits_per_byte']:.3f} bits/byte, {f['tokens_per_s']:.0f} tok/s "
              f"(first call incl. compile {f['first_call_s']:.1f}s)")
    return 0


main = exit_with(run)

if __name__ == "__main__":
    main()
