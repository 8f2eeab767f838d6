"""Pallas kernels (SPEC §3.4).

Each kernel module has a pure-jnp reference and one dispatch function that picks
the Pallas kernel on GPU/TPU and an XLA path on CPU (RecurrentGemma-style
selection); tests run the Pallas kernels on CPU with `interpret=True`.

* `ternary_matmul` — x @ (trits × scale) reading 2-bit packed weights directly.
* `group_matmul`   — x @ Ŵ for group-wise quantised (GPTQ) shared weights, reading
                     the 2–8 bit codes directly (XLA paths; no Pallas kernel yet).
* `pdr_chunked`    — the chunked PDR recurrence (grid over batch × row blocks),
                     differentiable through `jax.custom_vjp`.
"""
