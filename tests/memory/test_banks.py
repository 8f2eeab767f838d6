"""Majority bundles with kept counters against a NumPy bool reference: ties (even n,
the empty bank) break by the seeded tie vector, and adding then removing pairs
leaves exactly the banks `Banks.rebuild` makes from the remaining ones."""

import numpy as np
import pytest

from perspective_jax.memory import hypervector as hv
from perspective_jax.memory.banks import Banks, majority

DIM = 333          # not a multiple of 64: the tail word is exercised


def reference_bundle(members: np.ndarray, tie: np.ndarray) -> np.ndarray:
    """Per bit: 1 if more members have it set than not, 0 if fewer, tie[j] if as many
    (members [n, D] bool, tie [D] bool) → [D] bool."""
    ones = members.sum(0)
    zeros = len(members) - ones
    return np.where(ones > zeros, True, np.where(ones < zeros, False, tie))


@pytest.fixture
def tie_bits():
    return np.random.default_rng(99).random(DIM) < 0.5


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 7, 10])
def test_majority_equals_bool_reference_with_ties(n, tie_bits):
    rng = np.random.default_rng(n)
    members = rng.random((n, DIM)) < 0.5
    tie = hv.pack(tie_bits)
    got = majority(members.sum(0, dtype=np.int32), n, tie, DIM)
    np.testing.assert_array_equal(hv.unpack(got, DIM), reference_bundle(members, tie_bits))
    assert not np.any(got & ~hv.tail_mask(DIM))


def test_all_ties_give_the_tie_vector(tie_bits):
    tie = hv.pack(tie_bits)
    a = np.random.default_rng(1).random(DIM) < 0.5
    pair = np.stack([a, ~a])                              # every bit 1 of 2: a tie
    np.testing.assert_array_equal(majority(pair.sum(0), 2, tie, DIM), tie)
    np.testing.assert_array_equal(majority(np.zeros(DIM, np.int32), 0, tie, DIM), tie)
    np.testing.assert_array_equal(Banks(3, DIM, tie).packed, np.stack([tie] * 3))


def test_majority_batched_over_banks(tie_bits):
    rng = np.random.default_rng(2)
    tie = hv.pack(tie_bits)
    groups = [rng.random((n, DIM)) < 0.5 for n in (0, 2, 5, 6)]
    counts = np.stack([g.sum(0) for g in groups])
    got = majority(counts, np.array([len(g) for g in groups]), tie, DIM)
    for g, row in zip(groups, got):
        np.testing.assert_array_equal(hv.unpack(row, DIM), reference_bundle(g, tie_bits))


def test_rebuild_equals_reference_per_bank(tie_bits):
    rng = np.random.default_rng(3)
    n_banks, n = 7, 60
    bits = rng.random((n, DIM)) < 0.5
    bank_of = rng.integers(0, n_banks - 1, n)             # the last bank stays empty
    built = Banks.rebuild(n_banks, DIM, hv.pack(tie_bits), bank_of, hv.pack(bits))
    np.testing.assert_array_equal(built.sizes, np.bincount(bank_of, minlength=n_banks))
    for b in range(n_banks):
        want = reference_bundle(bits[bank_of == b], tie_bits)
        np.testing.assert_array_equal(hv.unpack(built.packed[b], DIM), want, err_msg=f"bank {b}")


def test_rebuild_across_its_row_blocks(tie_bits):
    """More rows than one block of the rebuild (4096), banks spanning two blocks."""
    rng = np.random.default_rng(4)
    n = 5000
    bits = rng.random((n, DIM)) < 0.5
    bank_of = rng.integers(0, 3, n)
    built = Banks.rebuild(3, DIM, hv.pack(tie_bits), bank_of, hv.pack(bits))
    for b in range(3):
        np.testing.assert_array_equal(hv.unpack(built.packed[b], DIM),
                                      reference_bundle(bits[bank_of == b], tie_bits))


def test_incremental_add_and_remove_equal_rebuild(tie_bits):
    rng = np.random.default_rng(5)
    n_banks, tie = 5, hv.pack(tie_bits)
    banks = Banks(n_banks, DIM, tie)
    rows: list[tuple[int, np.ndarray]] = []               # (bank, packed vector) kept
    built_counters = []

    def members(b):
        built_counters.append(b)
        return np.array([v for bb, v in rows if bb == b]).reshape(-1, hv.words(DIM))

    for step in range(120):
        if rows and rng.random() < 0.35:                  # remove a random kept vector
            i = int(rng.integers(len(rows)))
            b, v = rows[i]
            banks.remove(b, v, members)
            del rows[i]
        else:
            b, v = int(rng.integers(n_banks)), hv.random(rng, 1, DIM)[0]
            banks.add(b, v, members)
            rows.append((b, v))
        if step % 20 == 19 or step == 0:
            want = Banks.rebuild(n_banks, DIM, tie, np.array([b for b, _ in rows], np.int64),
                                 np.array([v for _, v in rows]).reshape(-1, hv.words(DIM)))
            np.testing.assert_array_equal(banks.packed, want.packed, err_msg=f"step {step}")
            np.testing.assert_array_equal(banks.sizes, want.sizes)
    # the counters of a bank are built once, from its members, the first time it changes
    assert sorted(built_counters) == sorted(set(built_counters))
    for b in range(n_banks):                              # empty every bank: all ties
        for _, v in [r for r in rows if r[0] == b]:
            banks.remove(b, v, members)
    rows.clear()
    np.testing.assert_array_equal(banks.packed, np.stack([tie] * n_banks))
    np.testing.assert_array_equal(banks.sizes, 0)


def test_counters_start_from_a_loaded_bank(tie_bits):
    """Banks given only packed bundles and sizes (as a memory file loads them) build
    the counters from the members on the first change."""
    rng = np.random.default_rng(6)
    tie = hv.pack(tie_bits)
    vecs = hv.random(rng, 9, DIM)
    bank_of = np.array([0, 1, 0, 1, 0, 1, 0, 1, 1])
    built = Banks.rebuild(2, DIM, tie, bank_of, vecs)
    loaded = Banks(2, DIM, tie, built.packed.copy(), built.sizes)
    loaded.remove(1, vecs[8], lambda b: vecs[bank_of == b])
    want = Banks.rebuild(2, DIM, tie, bank_of[:8], vecs[:8])
    np.testing.assert_array_equal(loaded.packed, want.packed)
    np.testing.assert_array_equal(loaded.sizes, want.sizes)
    np.testing.assert_array_equal(built.sizes, [4, 5])   # the loaded copy is its own
