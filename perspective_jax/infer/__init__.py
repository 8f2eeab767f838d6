"""Streaming inference (SPEC §3.5): the layer-streamed engine over a model directory
(tiers disk → host cache → device slots, prefetch, batched steps), conversations,
and the hardware envelope of a config."""
