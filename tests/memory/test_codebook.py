"""The sign-of-projections codebook: seeded and reproducible, centred, and two inputs
at angle θ differ in ≈ θ/π of the bits."""

import numpy as np
import pytest

from perspective_jax.errors import UserError
from perspective_jax.memory import hypervector as hv
from perspective_jax.memory.codebook import Codebook

IN_DIM, DIM = 48, 10_000


def at_angle(x: np.ndarray, theta: float, rng) -> np.ndarray:
    """A vector at angle θ from x (in the plane of x and a random orthogonal direction)."""
    u = x / np.linalg.norm(x)
    z = rng.standard_normal(x.shape)
    z -= (z @ u) * u
    z /= np.linalg.norm(z)
    return (np.cos(theta) * u + np.sin(theta) * z) * 3.7       # the length must not matter


def test_seeded_reproducible_and_seed_dependent():
    x = np.random.default_rng(0).standard_normal((5, IN_DIM)).astype(np.float32)
    a = Codebook(IN_DIM, DIM, seed=4).encode(x)
    np.testing.assert_array_equal(a, Codebook(IN_DIM, DIM, seed=4).encode(x))
    assert a.shape == (5, hv.words(DIM)) and a.dtype == np.uint64
    assert not np.any(a & ~hv.tail_mask(DIM))
    other = Codebook(IN_DIM, DIM, seed=5).encode(x)
    assert np.all(np.abs(hv.similarity(a, other) - 0.5) < 0.03)   # another seed: unrelated
    np.testing.assert_array_equal(Codebook(IN_DIM, DIM, seed=4).encode(x[2]), a[2])


def test_projection_is_standard_normal_in_blocks():
    p = Codebook(IN_DIM, 5000, seed=1).projection()              # 3 blocks of ≤ 2048 columns
    assert p.shape == (IN_DIM, 5000) and p.dtype == np.float32
    assert abs(p.mean()) < 0.01 and abs(p.std() - 1) < 0.01
    # no block repeats another: columns 0 and 2048 are independent draws
    assert abs(np.corrcoef(p[:, :2048].ravel(), p[:, 2048:4096].ravel())[0, 1]) < 0.02
    # a smaller dim is a prefix of the same stream block for block
    np.testing.assert_array_equal(Codebook(IN_DIM, 2048, seed=1).projection(), p[:, :2048])


def test_bits_are_signs_of_projections():
    rng = np.random.default_rng(2)
    book = Codebook(IN_DIM, 1000, seed=2)
    x = rng.standard_normal((3, IN_DIM)).astype(np.float32)
    want = (x.astype(np.float64) @ book.projection().astype(np.float64)) > 0
    np.testing.assert_array_equal(hv.unpack(book.encode(x), 1000), want)


@pytest.mark.parametrize("theta", [0.05, np.pi / 8, np.pi / 4, np.pi / 2, 3 * np.pi / 4, np.pi])
def test_angle_theta_differs_in_theta_over_pi_of_the_bits(theta):
    rng = np.random.default_rng(int(theta * 1000))
    book = Codebook(IN_DIM, DIM, seed=0)
    x = rng.standard_normal((4, IN_DIM))
    y = np.stack([at_angle(r, theta, rng) for r in x])
    share = hv.hamming(book.encode(x), book.encode(y)) / DIM
    # one share is Binomial(D, θ/π) / D: σ ≤ 0.005 (0.0013 at θ = 0.05)
    tol = 0.03 if theta > 0.1 else 0.006
    assert np.all(np.abs(share - theta / np.pi) < tol), (share, theta / np.pi)


def test_centre_is_subtracted():
    rng = np.random.default_rng(3)
    centre = rng.standard_normal(IN_DIM).astype(np.float32) * 10
    x = rng.standard_normal((4, IN_DIM)).astype(np.float32)
    centred = Codebook(IN_DIM, DIM, seed=0, centre=centre).encode(x + centre)
    np.testing.assert_array_equal(centred, Codebook(IN_DIM, DIM, seed=0).encode(x))
    # without the centre, inputs sharing a large offset all look alike
    plain = Codebook(IN_DIM, DIM, seed=0).encode(x + centre)
    assert hv.similarity(plain[0], plain[1]) > 0.8 > hv.similarity(centred[0], centred[1])


def test_bad_input_is_a_user_error():
    with pytest.raises(UserError, match="input dimension"):
        Codebook(0, DIM, seed=0)
    with pytest.raises(UserError, match="centre"):
        Codebook(IN_DIM, DIM, seed=0, centre=np.zeros(IN_DIM + 1))
    with pytest.raises(UserError, match="dimension"):
        Codebook(IN_DIM, 10, seed=0)
    with pytest.raises(UserError, match=f"{IN_DIM} values"):
        Codebook(IN_DIM, DIM, seed=0).encode(np.zeros((2, IN_DIM - 1)))
