"""Geometry of the flat torus T³ = [0, 1)³ on which experts sit (SPEC §3.3).

Pure functions on coordinates of shape [..., 3]; every result is wrapped back
into [0, 1). Lattice (Lx, Ly, Lz) puts expert (i, j, k) — flat index
i·Ly·Lz + j·Lz + k — at (i/Lx, j/Ly, k/Lz).
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np


def wrap(z):
    """z mod 1, into [0, 1). Gradient is the identity (away from the seam)."""
    return jnp.mod(z, 1.0)


def geodesic_delta(a, b):
    """Per-axis shortest wrapped separation: min(|a − b| mod 1, 1 − that) ∈ [0, ½]."""
    d = jnp.mod(jnp.abs(a - b), 1.0)
    return jnp.minimum(d, 1.0 - d)


def geodesic_distance(a, b):
    """Euclidean norm of the per-axis geodesic separations. a, b: [..., 3]."""
    return jnp.sqrt(jnp.sum(geodesic_delta(a, b) ** 2, axis=-1))


def geodesic_distance_sq(a, b):
    return jnp.sum(geodesic_delta(a, b) ** 2, axis=-1)


def signed_step(a, b):
    """The shortest wrapped displacement from a to b, per axis, in [−½, ½)."""
    return jnp.mod(b - a + 0.5, 1.0) - 0.5


def antipode(z):
    """The point farthest from z: z + ½ on every axis."""
    return wrap(z + 0.5)


def fold_step(z, delta):
    """Fold-in-place update: move existing coordinates by delta, wrapped (never
    appends a point). (0.99, 0.5, 0.99) + (0.05, 0, 0.04) → (0.04, 0.5, 0.03)."""
    return wrap(z + delta)


def lattice_index(lattice: tuple[int, int, int], i: int, j: int, k: int) -> int:
    lx, ly, lz = lattice
    return (i % lx) * ly * lz + (j % ly) * lz + (k % lz)


def lattice_positions(lattice: tuple[int, int, int]) -> np.ndarray:
    """[E, 3] float32 lattice coordinates, E = Lx·Ly·Lz, in flat-index order."""
    lx, ly, lz = lattice
    cells = itertools.product(range(lx), range(ly), range(lz))
    return np.asarray([(i / lx, j / ly, k / lz) for i, j, k in cells], np.float32)


def lattice_neighbours(lattice: tuple[int, int, int]) -> list[list[int]]:
    """Per expert, its distinct lattice neighbours (±1 along each axis, wrapped).

    Six for axes of size ≥ 3; an axis of size 2 contributes one neighbour (its
    +1 and −1 coincide) and an axis of size 1 none.
    """
    out = []
    for i, j, k in itertools.product(*(range(n) for n in lattice)):
        me = lattice_index(lattice, i, j, k)
        seen: list[int] = []
        for di, dj, dk in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)):
            n = lattice_index(lattice, i + di, j + dj, k + dk)
            if n != me and n not in seen:
                seen.append(n)
        out.append(seen)
    return out


def neighbour_pairs(lattice: tuple[int, int, int]) -> np.ndarray:
    """[P, 2] int32 unordered lattice-neighbour pairs (a < b), each once."""
    pairs = {(min(a, b), max(a, b)) for a, ns in enumerate(lattice_neighbours(lattice))
             for b in ns}
    return np.asarray(sorted(pairs), np.int32).reshape(-1, 2)


def neighbour_matrix(lattice: tuple[int, int, int]) -> np.ndarray:
    """[E, E] bool adjacency of the lattice."""
    e = int(np.prod(lattice))
    adj = np.zeros((e, e), bool)
    for a, ns in enumerate(lattice_neighbours(lattice)):
        adj[a, ns] = True
    return adj
