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


def _snap_reference(w, lattice, margin, nudge=0.02):
    """consensus_snap by loops over entries (tensor scale), float64 decisions."""
    from perspective_jax.moe import torus
    w = np.array(w, np.float32, copy=True)
    neighbours = torus.lattice_neighbours(lattice)
    trit = lambda v: int(np.clip(np.round(v), -1, 1))  # noqa: E731
    moved = 0
    for e, near in enumerate(neighbours):
        s = np.abs(w[e]).mean() + 1e-8
        ns = [np.abs(w[n]).mean() + 1e-8 for n in near]
        new = w[e].copy()
        for k, n in np.ndindex(*w.shape[1:]):
            u = w[e, k, n] / s
            own = trit(u)
            votes = [trit(w[m, k, n] / sm) for m, sm in zip(near, ns)]
            counts = {v: votes.count(v) for v in (-1, 0, 1)}
            target = [v for v in (-1, 0, 1) if counts[v] == max(counts.values())][0]
            if target == own or abs(target - own) != 1 or counts[target] <= counts[own]:
                continue
            gap = abs(u) - 0.5 if target == 0 else 0.5 - target * u
            if gap <= margin:
                new[k, n] = (np.sign(u) * (0.5 - nudge) if target == 0
                             else target * (0.5 + nudge)) * s
                moved += 1
        w[e] = new
    return w, moved


def test_consensus_snap_matches_loop_reference_and_brings_neighbours_closer():
    from perspective_jax.moe.align import consensus_snap, neighbour_trit_difference
    lattice = (2, 2, 2)
    rng = np.random.default_rng(3)
    base = rng.normal(size=(1, 6, 5))
    w = (base + 0.6 * rng.normal(size=(8, 6, 5))).astype(np.float32)
    got, moved = consensus_snap(w, lattice, 0.3)
    ref, ref_moved = _snap_reference(w, lattice, 0.3)
    assert moved == ref_moved > 0
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert (neighbour_trit_difference(got, lattice)
            < neighbour_trit_difference(w, lattice))
    # only near-threshold entries move, and by less than the margin (in code units)
    s = np.abs(w).mean(axis=(1, 2), keepdims=True)
    changed = got != w
    assert np.all(np.abs(got - w)[changed] / np.broadcast_to(s, w.shape)[changed] < 0.3 + 0.03)
    same, zero = consensus_snap(w, lattice, 0.0)
    assert zero == 0 and np.array_equal(same, w)
