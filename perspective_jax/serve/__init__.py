"""perspective-serve: an OpenAI-compatible HTTP server over the streaming engine,
with continuous batching (docs/serving.md)."""
