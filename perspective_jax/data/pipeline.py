"""grain pipeline: random fixed-length windows of a token file → global batches.

Each epoch visits every start position once in a seeded random order
(`MapDataset.shuffle` + `repeat`, reshuffled per epoch). Global batch b is the
windows at positions [b·B, (b+1)·B) of that stream, laid out
[grad_accum, micro, seq_len + 1]; a process reads only its own rows of the micro
dimension (`rows`, from the batch sharding), so N processes feed exactly the
global batch one process would — same windows in the same places. The position is
the number of batches taken, which the trainer keeps equal to the step: a resume
(with any process count) starts at batch `start`.
"""

from __future__ import annotations

from typing import Optional

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


class TrainBatches:
    """Iterator of this process's part of global batches start, start + 1, …:
    int32 [grad_accum, hi - lo, seq_len + 1] with (lo, hi) = `rows` of the micro
    dimension (None: all of it). `position` = the next global batch."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, grad_accum: int,
                 seed: int, start: int = 0, rows: Optional[tuple[int, int]] = None):
        self.source = WindowSource(tokens, seq_len)
        if len(self.source) == 0:
            raise UserError(f"the training split ({len(tokens)} tokens) is shorter than "
                            f"data.seq_len + 1 = {seq_len + 1}; lower data.seq_len or add text")
        if batch_size % grad_accum:
            raise UserError(f"train.batch_size={batch_size} is not divisible by "
                            f"train.grad_accum={grad_accum}")
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.micro = batch_size // grad_accum
        self.rows = rows or (0, self.micro)
        self.order = grain.MapDataset.range(len(self.source)).shuffle(seed=seed).repeat(None)
        self.position = start

    def batch(self, b: int) -> np.ndarray:
        """This process's rows of global batch `b`."""
        lo, hi = self.rows
        first = b * self.batch_size
        return np.stack([
            np.stack([self.source[self.order[first + a * self.micro + r]]
                      for r in range(lo, hi)])
            for a in range(self.grad_accum)])

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        out = self.batch(self.position)
        self.position += 1
        return out


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
