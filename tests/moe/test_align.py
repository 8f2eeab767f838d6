"""MDS re-embedding: recovers a planted lattice layout from weight distances."""

import itertools

import numpy as np

from perspective_jax.moe import torus
from perspective_jax.moe.align import align_layer, classical_mds, pairwise_distances


def test_classical_mds_preserves_euclidean_distances():
    pts = np.random.default_rng(0).normal(size=(12, 3))
    d = pairwise_distances(pts)
    np.testing.assert_allclose(pairwise_distances(classical_mds(d, 3)), d, atol=1e-8)


def test_align_puts_similar_experts_on_neighbouring_cells():
    """Experts whose weights are (scrambled) cube corners: after alignment, lattice
    neighbours are exactly the experts whose weights differ along one axis."""
    lattice = (2, 2, 2)
    corners = np.asarray(list(itertools.product((0.0, 1.0), repeat=3)))
    scrambled = corners[np.random.default_rng(1).permutation(8)]
    q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(24, 3)))
    flat = scrambled @ q.T                               # an isometric embedding in R^24
    weights = {"w_gate": flat[:, :8].reshape(8, 2, 4), "w_up": flat[:, 8:16].reshape(8, 2, 4),
               "w_down": flat[:, 16:].reshape(8, 4, 2)}
    perm, before, after = align_layer(weights, lattice)
    assert sorted(perm.tolist()) == list(range(8))
    assert after < 1e-9 and after <= before
    placed = scrambled[perm]                             # corner held by each lattice slot
    adj = torus.neighbour_matrix(lattice)
    for a in range(8):
        for b in range(8):
            if a != b:
                assert adj[a, b] == (np.abs(placed[a] - placed[b]).sum() == 1.0)


def test_align_never_worsens_the_layout():
    """Experts already laid out exactly on the lattice keep their slots."""
    lattice = (2, 2, 2)
    corners = np.asarray(list(itertools.product((0.0, 1.0), repeat=3)))
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(24, 3)))
    flat = corners @ q.T
    weights = {"w_gate": flat[:, :8].reshape(8, 2, 4), "w_up": flat[:, 8:16].reshape(8, 2, 4),
               "w_down": flat[:, 16:].reshape(8, 4, 2)}
    perm, before, after = align_layer(weights, lattice)
    assert after <= before
    noisy = {k: v + np.random.default_rng(4).normal(size=v.shape) for k, v in weights.items()}
    _, before, after = align_layer(noisy, lattice)
    assert after <= before
