"""Streaming inference (SPEC §3.5): export to a model directory, tiered expert
store (disk → host cache → device slots), layer-streamed decode engine."""
