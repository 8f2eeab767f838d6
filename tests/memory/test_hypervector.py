"""Packed hypervectors against plain NumPy bool arrays: pack/unpack, bind, Hamming
(popcount vs a naive count), hamming_table on both paths, flip."""

import numpy as np
import pytest

from perspective_jax.errors import UserError
from perspective_jax.memory import hypervector as hv


def naive_pack(bits: np.ndarray) -> np.ndarray:
    """[n, D] bool → [n, ⌈D/64⌉] uint64, bit j at word j // 64, bit j % 64 (Python ints)."""
    n, dim = bits.shape
    out = np.zeros((n, hv.words(dim)), np.uint64)
    for i in range(n):
        for w in range(hv.words(dim)):
            word = sum(1 << j for j in range(64) if w * 64 + j < dim and bits[i, w * 64 + j])
            out[i, w] = np.uint64(word)
    return out


def naive_table(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Differing bits of bool rows a [Q, D] and b [N, D] by counting (|a| + |b| − 2 a·b)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a.sum(1)[:, None] + b.sum(1)[None, :] - 2 * a @ b.T).round().astype(np.int64)


@pytest.mark.parametrize("dim", [64, 100, 130, 1000])
def test_pack_matches_naive_layout_and_round_trips(dim):
    bits = np.random.default_rng(dim).random((5, dim)) < 0.5
    packed = hv.pack(bits)
    assert packed.dtype == np.uint64 and packed.shape == (5, hv.words(dim))
    np.testing.assert_array_equal(packed, naive_pack(bits))
    np.testing.assert_array_equal(hv.unpack(packed, dim), bits)


@pytest.mark.parametrize("dim", [100, 10_000, 10_001])
def test_bits_past_dim_are_zero(dim):
    rng = np.random.default_rng(1)
    ones = hv.pack(np.ones((3, dim), bool))
    for x in (ones, hv.random(rng, 4, dim), hv.flip(ones, 0.3, rng, dim)):
        assert not np.any(x & ~hv.tail_mask(dim)), "bits past D must be 0"
        assert int(np.bitwise_count(x).sum(-1).max()) <= dim
    assert int(np.bitwise_count(ones).sum(-1)[0]) == dim


def test_pack_keeps_leading_axes():
    bits = np.random.default_rng(2).random((2, 3, 200)) < 0.5
    packed = hv.pack(bits)
    assert packed.shape == (2, 3, 4)
    np.testing.assert_array_equal(hv.unpack(packed, 200), bits)


def test_bind_is_xor_and_self_inverse():
    rng = np.random.default_rng(3)
    abits, bbits = rng.random((2, 6, 1000)) < 0.5
    a, b = hv.pack(abits), hv.pack(bbits)
    np.testing.assert_array_equal(hv.bind(hv.bind(a, b), b), a)
    np.testing.assert_array_equal(hv.unpack(hv.bind(a, b), 1000), abits ^ bbits)
    assert not np.any(hv.bind(a, a))


@pytest.mark.parametrize("dim", [64, 777, 10_000])
def test_hamming_and_similarity_equal_a_naive_count(dim):
    rng = np.random.default_rng(dim)
    abits, bbits = rng.random((2, 7, dim)) < rng.random((2, 7, 1))   # varied densities
    a, b = hv.pack(abits), hv.pack(bbits)
    want = (abits != bbits).sum(-1)
    np.testing.assert_array_equal(hv.hamming(a, b), want)
    np.testing.assert_allclose(hv.similarity(a, b, dim), 1 - want / dim)
    np.testing.assert_array_equal(hv.hamming(a, a), 0)


# (Q, N, dim): below, at and above JAX_MIN_CELLS = 2^22 word comparisons
# (300 queries: the JAX path pads its last block; W ≤ 32: NumPy's word-major path)
TABLE_SHAPES = [(1, 1, 64), (3, 5, 100), (17, 33, 1000), (40, 50, 10_000), (300, 70, 2100),
                (2048, 1023, 128), (2048, 1024, 128), (2048, 1025, 100)]


@pytest.mark.parametrize("q,n,dim", TABLE_SHAPES)
def test_hamming_table_numpy_and_jax_paths_equal_naive(q, n, dim):
    rng = np.random.default_rng(q * n + dim)
    abits = rng.random((q, dim)) < 0.5
    bbits = rng.random((n, dim)) < 0.5
    bbits[0] = abits[0]                                   # one exact match (distance 0)
    if n > 1:
        bbits[1] = ~abits[0]                              # one opposite (distance dim)
    a, b = hv.pack(abits), hv.pack(bbits)
    want = naive_table(abits, bbits)
    for use_jax in (False, True, None):
        got = hv.hamming_table(a, b, use_jax=use_jax)
        assert got.shape == (q, n)
        np.testing.assert_array_equal(got, want, err_msg=f"use_jax={use_jax}")
    assert want[0, 0] == 0 and (n == 1 or want[0, 1] == dim)


def test_hamming_table_picks_the_jax_path_from_the_threshold(monkeypatch):
    calls = []
    real = hv._hamming_table_jax
    monkeypatch.setattr(hv, "_hamming_table_jax", lambda q, x: calls.append(1) or real(q, x))
    rng = np.random.default_rng(5)
    x = hv.random(rng, 1024, 128)                         # W = 2
    hv.hamming_table(hv.random(rng, 2047, 128), x)        # 2047·1024·2 < 2^22: NumPy
    assert calls == []
    hv.hamming_table(hv.random(rng, 2048, 128), x)        # = 2^22: JAX, in blocks
    assert len(calls) == 2048 // hv.JAX_BLOCK


def test_jax_path_compiles_a_few_programs_for_any_number_of_queries():
    rng = np.random.default_rng(9)
    x = hv.random(rng, 37, 320)                           # a shape no other test uses
    before = hv._hamming_table_jax._cache_size()
    for q in range(1, 600, 7):                            # 86 different Q
        a = hv.random(rng, q, 320)
        np.testing.assert_array_equal(hv.hamming_table(a, x, use_jax=True),
                                      hv.hamming_table(a, x, use_jax=False))
    assert hv._hamming_table_jax._cache_size() - before <= 9   # blocks of 1, 2, 4 … 256


def test_hamming_table_one_vector_each_and_word_mismatch():
    rng = np.random.default_rng(6)
    a, b = hv.random(rng, 1, 1000)[0], hv.random(rng, 1, 1000)[0]
    np.testing.assert_array_equal(hv.hamming_table(a, b), [[hv.hamming(a, b)]])
    with pytest.raises(UserError, match="cannot be compared"):
        hv.hamming_table(a, hv.random(rng, 1, 2000))


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 1.0])
def test_flip_changes_exactly_that_many_distinct_bits(fraction):
    rng = np.random.default_rng(7)
    dim = 1000
    x = hv.random(rng, 20, dim)
    y = hv.flip(x, fraction, rng, dim)
    np.testing.assert_array_equal(hv.hamming(x, y), round(fraction * dim))
    assert y.shape == x.shape and not np.any(y & ~hv.tail_mask(dim))


def test_random_is_seeded_and_uniform():
    a = hv.random(np.random.default_rng(8), 50, 10_000)
    np.testing.assert_array_equal(a, hv.random(np.random.default_rng(8), 50, 10_000))
    ones = hv.unpack(a, 10_000).mean()
    assert abs(ones - 0.5) < 0.005                        # 500,000 bits: σ = 0.0007
    sims = hv.similarity(a[:-1], a[1:])
    assert np.all(np.abs(sims - 0.5) < 0.03)              # unrelated ≈ 0.5 (σ = 0.005)


@pytest.mark.parametrize("dim", [0, 63, 64.0, "100"])
def test_check_dim_rejects(dim):
    with pytest.raises(UserError, match="dimension"):
        hv.check_dim(dim)
