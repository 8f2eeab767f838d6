"""Torus geometry against brute-force numpy references."""

import itertools

import jax.numpy as jnp
import numpy as np

from perspective_jax.moe import torus


def brute_geodesic(a, b):
    """min over the 27 periodic images of the Euclidean distance."""
    best = np.inf
    for shift in itertools.product((-1, 0, 1), repeat=3):
        best = min(best, np.linalg.norm(np.asarray(a) - (np.asarray(b) + shift)))
    return best


def test_spec_fold_example():
    out = np.asarray(torus.fold_step(jnp.array([0.99, 0.5, 0.99]), jnp.array([0.05, 0.0, 0.04])))
    np.testing.assert_allclose(out, [0.04, 0.5, 0.03], atol=1e-6)


def test_geodesic_matches_periodic_images_and_is_symmetric():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 1, (50, 3)), rng.uniform(0, 1, (50, 3))
    d_ab = np.asarray(torus.geodesic_distance(jnp.asarray(a), jnp.asarray(b)))
    d_ba = np.asarray(torus.geodesic_distance(jnp.asarray(b), jnp.asarray(a)))
    np.testing.assert_allclose(d_ab, d_ba, atol=1e-6)
    np.testing.assert_allclose(d_ab, [brute_geodesic(x, y) for x, y in zip(a, b)], atol=1e-5)
    # across the seam: 0.95 and 0.05 are 0.1 apart, not 0.9
    assert abs(float(torus.geodesic_distance(jnp.array([0.95, 0, 0]),
                                             jnp.array([0.05, 0, 0]))) - 0.1) < 1e-6
    assert float(torus.geodesic_distance(jnp.array([0.3, 0.2, 0.1]),
                                         jnp.array([1.3, -0.8, 2.1]))) < 1e-6


def test_antipode_is_the_farthest_point():
    z = jnp.array([0.1, 0.7, 0.95])
    far = torus.antipode(z)
    assert abs(float(torus.geodesic_distance(z, far)) - np.sqrt(3) / 2) < 1e-6
    rng = np.random.default_rng(1)
    others = jnp.asarray(rng.uniform(0, 1, (200, 3)))
    assert float(torus.geodesic_distance(z, others).max()) <= np.sqrt(3) / 2 + 1e-6


def test_signed_step_is_shortest_displacement():
    a, b = jnp.array([0.95, 0.1, 0.5]), jnp.array([0.05, 0.9, 0.5])
    np.testing.assert_allclose(np.asarray(torus.signed_step(a, b)), [0.1, -0.2, 0.0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(torus.wrap(a + torus.signed_step(a, b))),
                               np.asarray(b), atol=1e-6)


def test_lattice_positions_and_neighbours():
    pos = torus.lattice_positions((8, 4, 4))
    assert pos.shape == (128, 3)
    assert np.allclose(pos[torus.lattice_index((8, 4, 4), 3, 2, 1)], [3 / 8, 2 / 4, 1 / 4])
    neigh = torus.lattice_neighbours((8, 4, 4))
    assert all(len(n) == 6 for n in neigh)
    # neighbours sit exactly one lattice step away along one axis, with wrap-around
    for e, ns in enumerate(neigh):
        steps = np.abs(np.asarray(torus.signed_step(jnp.asarray(pos[e]), jnp.asarray(pos[ns]))))
        assert all(sorted(s.round(6).tolist()) in ([0, 0, 1 / 8], [0, 0, 1 / 4]) for s in steps)
    corner = torus.lattice_index((8, 4, 4), 0, 0, 0)
    assert torus.lattice_index((8, 4, 4), 7, 0, 0) in neigh[corner]
    # size-2 axes: +1 and −1 coincide, so each expert has 3 distinct neighbours
    assert all(len(n) == 3 for n in torus.lattice_neighbours((2, 2, 2)))
    pairs = torus.neighbour_pairs((8, 4, 4))
    assert len(pairs) == 128 * 6 // 2
    adj = torus.neighbour_matrix((8, 4, 4))
    assert (adj == adj.T).all() and not adj.diagonal().any()
