"""Memory of one adaptation update as the model gets deeper: XLA's memory analysis of
the compiled in-memory update (abstract shapes, nothing allocated) — forward
gradients with one tangent per pass vs the backprop LoRA gradient — for the tiny
curriculum's model at several depths (periods of PDR, PDR, PDR, GQA).

    python tools/compile_adapt_memory.py [--config curricula/tiny.yaml] \
        [--layers 4,8,16,32] [--batch 10] [--seq-len 128] [--directions 8]

Backprop keeps every layer's activations for the backward pass; a forward pass with
tangents keeps one layer's, so the ratio should fall as layers are added.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from perspective_jax.adapt.loop import AdaptConfig, trainable_unravel
from perspective_jax.adapt.target import InMemoryTarget
from perspective_jax.config.loader import load_config
from perspective_jax.model.extensions import init_lora
from perspective_jax.model.transformer import abstract_params

MB = 1 << 20


def temps(cfg, batch: int, seq_len: int, k: int) -> tuple[int, int]:
    params = abstract_params(cfg.model, cfg.moe)
    target = InMemoryTarget(cfg, params, tangents_per_pass=1)
    lora = init_lora(cfg.model, jax.random.key(0))
    unravel, dim = trainable_unravel(lora, AdaptConfig().adapt_a)
    tangents = jax.eval_shape(lambda: jax.vmap(unravel)(jnp.zeros((k, dim))))
    windows = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
    fg = target._derivatives.lower(params, windows, lora, tangents).compile()
    bp = jax.jit(jax.value_and_grad(lambda a, p, w: target.loss_fn(p, w, a))).lower(
        lora, params, windows).compile()
    return (int(fg.memory_analysis().temp_size_in_bytes),
            int(bp.memory_analysis().temp_size_in_bytes))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="curricula/tiny.yaml")
    p.add_argument("--layers", default="4,8,16,32")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--directions", type=int, default=8)
    args = p.parse_args(argv)
    base = load_config(args.config)
    print(f"| layers | forward, 1 tangent per pass MB | backprop MB | ratio |\n|---|---:|---:|---:|")
    for n in (int(x) for x in args.layers.split(",")):
        cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, n_layers=n))
        fg, bp = temps(cfg, args.batch, args.seq_len, args.directions)
        print(f"| {n} | {fg / MB:,.1f} | {bp / MB:,.1f} | {fg / bp:.2f} |", flush=True)


if __name__ == "__main__":
    main()
