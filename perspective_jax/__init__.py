"""Perspective-JAX: a streamed, ternary, torus-routed sparse MoE language model."""

__version__ = "0.1.0"
