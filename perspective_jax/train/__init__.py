"""Training: mesh/sharding, optimizer and steps, checkpoints, metrics, the loop."""
