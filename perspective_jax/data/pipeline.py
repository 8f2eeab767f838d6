"""grain pipeline: random fixed-length windows of a token file → batches.

Each epoch visits every start position once in a seeded random order
(`MapDataset.shuffle` + `repeat`, reshuffled per epoch); the order is split
across processes (`slice(process_index, None, process_count)`) so each host
reads its own share; the iterator state is checkpointable with orbax.

A batch is an int32 array [grad_accum, per_process_batch / grad_accum, seq_len + 1];
inputs are [..., :-1] and targets [..., 1:].
"""

from __future__ import annotations

import grain
import numpy as np

from perspective_jax.errors import UserError


class WindowSource:
    """Random-access source: item i is tokens[i : i + seq_len + 1] (int32)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(len(self.tokens) - self.seq_len, 0)

    def __getitem__(self, index: int) -> np.ndarray:
        return np.asarray(self.tokens[index:index + self.seq_len + 1], dtype=np.int32)


def train_iterator(tokens: np.ndarray, seq_len: int, batch_size: int, grad_accum: int,
                   seed: int, process_index: int = 0, process_count: int = 1):
    """Checkpointable grain iterator of [grad_accum, micro, seq_len + 1] batches."""
    source = WindowSource(tokens, seq_len)
    if len(source) == 0:
        raise UserError(f"the training split ({len(tokens)} tokens) is shorter than "
                        f"data.seq_len + 1 = {seq_len + 1}; lower data.seq_len or add text")
    if batch_size % process_count:
        raise UserError(f"train.batch_size={batch_size} is not divisible by the "
                        f"{process_count} processes")
    local = batch_size // process_count
    if local % grad_accum:
        raise UserError(f"per-process batch {local} is not divisible by "
                        f"train.grad_accum={grad_accum}")
    micro = local // grad_accum

    def to_accum(batch: np.ndarray) -> np.ndarray:
        return batch.reshape(grad_accum, micro, seq_len + 1)

    ds = (grain.MapDataset.range(len(source))
          .shuffle(seed=seed)
          .repeat(None)
          .slice(slice(process_index, None, process_count))
          .map(source.__getitem__)
          .batch(local, drop_remainder=True)
          .map(to_accum))
    return iter(ds.to_iter_dataset())


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int
                 ) -> list[np.ndarray]:
    """Fixed validation windows spread evenly over the split (same every eval)."""
    source = WindowSource(tokens, seq_len)
    if len(source) == 0:
        raise UserError(f"the validation split ({len(tokens)} tokens) is shorter than "
                        f"data.seq_len + 1 = {seq_len + 1}; lower data.seq_len, raise "
                        "data.val_fraction or add text")
    count = batch_size * n_batches
    starts = np.linspace(0, len(source) - 1, count).astype(np.int64)
    windows = np.stack([source[int(s)] for s in starts])
    return [windows[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]
