"""Pallas kernels (SPEC §3.4): ternary matmul and chunked PDR.

Each kernel lives in its own module with a pure-jnp reference and one dispatch
function that picks the Pallas kernel on GPU/TPU and the XLA path on CPU, in
the style of RecurrentGemma's scan selection. The kernels arrive with the
ternary-experts work (issue 5); until then the XLA implementations in
`perspective_jax.model.pdr_scan` are the only ones and are used everywhere.
"""
