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


def _codes(w: np.ndarray, granularity: str) -> tuple[np.ndarray, np.ndarray]:
    """(u = w / s, s) with s = mean|w| over [K, N] (tensor) or K (row), keepdims."""
    axes = (-2, -1) if granularity == "tensor" else (-2,)
    s = np.abs(w).mean(axis=axes, keepdims=True) + 1e-8
    return w / s, s


def _trits(u: np.ndarray) -> np.ndarray:
    return np.clip(np.round(u), -1, 1).astype(np.int8)


def consensus_snap(w: np.ndarray, lattice, margin: float, granularity: str = "tensor",
                   nudge: float = 0.02) -> tuple[np.ndarray, int]:
    """Move near-threshold weights of one routed matrix [E, K, N] so their trits agree
    with their lattice neighbours' majority (align stage, `moe.align_consensus`).

    Expert by expert (in flat order, each seeing the already moved ones), an entry
    whose trit differs by one step from a trit more of its neighbours hold than its
    own, and whose code u = w / s lies within `margin` of that trit's range (|u| < ½
    for 0, ±u > ½ for ±1), is set just inside that range (`nudge` past the
    threshold). Returns (the new matrix, entries moved). margin = 0: unchanged."""
    w = np.array(w, np.float32, copy=True)
    if margin <= 0:
        return w, 0
    neighbours = torus.lattice_neighbours(tuple(lattice))
    moved = 0
    for e, near in enumerate(neighbours):
        if not near:
            continue
        u, s = _codes(w[e], granularity)
        own = _trits(u)
        theirs = np.stack([_trits(_codes(w[n], granularity)[0]) for n in near])
        counts = np.stack([(theirs == v).sum(0) for v in (-1, 0, 1)])       # [3, K, N]
        target = counts.argmax(0).astype(np.int8) - 1
        own_count = np.take_along_axis(counts, (own + 1)[None].astype(np.int64), 0)[0]
        wanted = (target != own) & (np.abs(target - own) == 1) & (counts.max(0) > own_count)
        gap = np.where(target == 0, np.abs(u) - 0.5, 0.5 - target * u)      # ≥ 0 to cross
        flip = wanted & (gap <= margin)
        new_u = np.where(target == 0, np.sign(u) * (0.5 - nudge), target * (0.5 + nudge))
        w[e] = np.where(flip, new_u * s, w[e])
        moved += int(flip.sum())
    return w, moved


def neighbour_trit_difference(w: np.ndarray, lattice, granularity: str = "tensor") -> float:
    """Mean share of differing trits over the lattice-neighbour pairs of [E, K, N]."""
    trits = _trits(_codes(np.asarray(w, np.float32), granularity)[0])
    pairs = torus.neighbour_pairs(tuple(lattice))
    if len(pairs) == 0:
        return 0.0
    return float(np.mean([(trits[a] != trits[b]).mean() for a, b in pairs]))
