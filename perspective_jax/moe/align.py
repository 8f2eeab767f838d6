"""Re-embed experts on the torus from their weight distances (SPEC §4 `align`).

Per routed layer: pairwise L2 distances between the experts' (ternary) weights
→ classical metric MDS to 3-D → scaled into [0, 1)³ → snapped to the lattice by
an optimal assignment (Hungarian, squared geodesic cost), trying every axis
permutation and reflection and keeping the assignment whose lattice distances
best match the weight distances (lowest normalised stress). Experts are then
permuted so that each sits at its assigned cell; offsets restart at zero.
Similar experts end up as lattice neighbours, which is what delta streaming needs.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.optimize import linear_sum_assignment

from perspective_jax.moe import torus

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def pairwise_distances(flat: np.ndarray) -> np.ndarray:
    """[E, F] → [E, E] Euclidean distances (float64)."""
    f = flat.astype(np.float64)
    sq = (f * f).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * f @ f.T, 0.0)
    np.fill_diagonal(d2, 0.0)
    return np.sqrt(d2)


def classical_mds(dist: np.ndarray, dims: int = 3) -> np.ndarray:
    """Torgerson MDS: top eigenvectors of −½ J D² J, scaled by √eigenvalue. [E, dims]."""
    e = dist.shape[0]
    j = np.eye(e) - 1.0 / e
    b = -0.5 * j @ (dist ** 2) @ j
    vals, vecs = np.linalg.eigh(b)
    order = np.argsort(vals)[::-1][:dims]
    return vecs[:, order] * np.sqrt(np.maximum(vals[order], 0.0))


def _stress(dist: np.ndarray, coords: np.ndarray) -> float:
    """Normalised stress between weight distances and torus distances (scale-free)."""
    t = np.asarray(torus.geodesic_distance(coords[:, None, :], coords[None, :, :]))
    iu = np.triu_indices(len(dist), 1)
    a, b = dist[iu], t[iu]
    scale = (a @ b) / max(b @ b, 1e-12)
    return float(((a - scale * b) ** 2).sum() / max((a ** 2).sum(), 1e-12))


def lattice_assignment(dist: np.ndarray, lattice: tuple[int, int, int]) -> tuple[np.ndarray, float]:
    """Cell index for every expert (a permutation) and its stress."""
    cells = torus.lattice_positions(lattice).astype(np.float64)          # [E, 3]
    x = classical_mds(dist, 3)
    best = (np.arange(len(dist)), np.inf)
    for axes in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            y = x[:, axes] * np.asarray(signs)
            span = y.max(0) - y.min(0)
            unit = (y - y.min(0)) / np.where(span > 0, span, 1.0)       # [0, 1]
            unit = unit * (1.0 - 1.0 / np.asarray(lattice))              # onto the cell range
            cost = np.asarray(torus.geodesic_distance_sq(unit[:, None, :], cells[None]))
            rows, cols = linear_sum_assignment(cost)
            assign = np.empty(len(dist), np.int64)
            assign[rows] = cols
            s = _stress(dist, cells[assign])
            if s < best[1]:
                best = (assign, s)
    return best


def align_layer(weights: dict, lattice) -> tuple[np.ndarray, float, float]:
    """weights: name → [E, a, b] of one routed layer (one period). Returns
    (perm, stress_before, stress_after) where new expert slot c holds old expert perm[c]."""
    e = weights["w_gate"].shape[0]
    flat = np.concatenate([np.asarray(weights[n]).reshape(e, -1) for n in EXPERT_WEIGHTS], 1)
    dist = pairwise_distances(flat)
    cells = torus.lattice_positions(lattice).astype(np.float64)
    before = _stress(dist, cells)
    assign, after = lattice_assignment(dist, lattice)
    if after >= before:                # never make the layout worse: keep it as it is
        return np.arange(e), before, before
    perm = np.argsort(assign)          # slot c ← the expert assigned to cell c
    return perm, before, after
