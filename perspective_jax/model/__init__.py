"""Flax modules of the Perspective network and their pure-function kernels."""
