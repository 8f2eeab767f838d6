"""From the model's representation to hypervectors: a sign-of-projections
locality-sensitive hash (SPEC §3.7 "codebook").

    book = Codebook(in_dim=d, dim=10_000, seed=0, centre=mean_embedding)
    hvs = book.encode(x)          # x [N, d] float → packed [N, W]

    bit j of encode(x) = [ (x − centre) · g_j > 0 ],   g_j ~ N(0, I_d) (seeded, PCG64)

Two vectors at angle θ differ in a share θ/π of the bits, so texts the model
represents alike get nearby hypervectors, and a fuzzy key finds its bank. The
projection is regenerated from (seed, in_dim) in column blocks, never stored;
`centre` (the mean of the model's token embeddings) is stored with the memory.
"""

from __future__ import annotations

import numpy as np

from perspective_jax.errors import UserError
from perspective_jax.memory import hypervector as hv
from perspective_jax.memory.store import seeded

BLOCK = 2048                # projection columns generated at a time


class Codebook:
    def __init__(self, in_dim: int, dim: int, seed: int, centre=None):
        if not isinstance(in_dim, int) or in_dim < 1:
            raise UserError(f"codebook input dimension {in_dim}: must be a positive integer")
        self.in_dim, self.dim, self.seed = in_dim, hv.check_dim(dim), seed
        self.centre = (np.zeros(in_dim, np.float32) if centre is None
                       else np.asarray(centre, np.float32).reshape(-1))
        if self.centre.shape != (in_dim,):
            raise UserError(f"codebook centre has {self.centre.size} values for "
                            f"input dimension {in_dim}")
        self._proj = None

    def projection(self) -> np.ndarray:
        """[in_dim, dim] float32 N(0, 1), generated from (seed, in_dim) block by block."""
        if self._proj is None:
            rng = seeded(self.seed, 2)
            cols = [rng.standard_normal((self.in_dim, min(BLOCK, self.dim - j)), np.float32)
                    for j in range(0, self.dim, BLOCK)]
            self._proj = np.concatenate(cols, axis=1)
        return self._proj

    def encode(self, x) -> np.ndarray:
        """x [..., in_dim] → packed hypervectors [..., W]."""
        x = np.asarray(x, np.float32)
        if x.shape[-1] != self.in_dim:
            raise UserError(f"the codebook takes vectors of {self.in_dim} values; got "
                            f"{x.shape[-1]}")
        return hv.pack(((x - self.centre) @ self.projection()) > 0)
