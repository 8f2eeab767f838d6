"""Training: the trainer (setup, loop, hooks, evaluation), curriculum stages, steps and
optimizer, mesh/sharding, objectives, metrics."""
