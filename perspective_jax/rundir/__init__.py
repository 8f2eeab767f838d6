"""The run directory a training stage writes: its layout, resolved config and
orbax checkpoints (read by training and export alike)."""
