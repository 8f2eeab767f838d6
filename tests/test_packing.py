"""Packed ternary formats: lossless round trips, edge lengths, absmean quantiser."""

import numpy as np
import pytest

from perspective_jax.ternary.packing import (LUT_2BIT, TernaryTensor, absmean_ternarize,
                                             pack_2bit, pack_base3, sparsity, unpack_2bit,
                                             unpack_base3)


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 6, 19, 20, 21, 1000, 4099])
def test_round_trips_any_length(n):
    trits = np.random.default_rng(n).integers(-1, 2, n).astype(np.int8)
    b3 = pack_base3(trits)
    assert b3.dtype == np.uint8 and len(b3) == -(-n // 5) and (b3 <= 242).all()
    assert np.array_equal(unpack_base3(b3, n), trits)
    b2 = pack_2bit(trits)
    assert len(b2) == -(-n // 4)
    assert np.array_equal(unpack_2bit(b2, n), trits)


def test_base3_digit_order_matches_spec():
    # value = t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4 with digits t+1
    assert pack_base3([-1, -1, -1, -1, -1])[0] == 0
    assert pack_base3([1, 1, 1, 1, 1])[0] == 242
    assert pack_base3([0, -1, -1, -1, -1])[0] == 1
    assert pack_base3([-1, 0, -1, -1, -1])[0] == 3
    assert pack_base3([-1, -1, -1, -1, 0])[0] == 81


def test_lookup_table_and_corruption():
    assert LUT_2BIT.shape == (256, 4)
    assert LUT_2BIT[0b10_01_00_01].tolist() == [0, -1, 0, 1]
    with pytest.raises(ValueError, match="242"):
        unpack_base3(np.array([250], np.uint8), 5)
    with pytest.raises(ValueError, match="trits"):
        pack_base3([2])


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_absmean_quantiser_and_packed_tensor(granularity):
    w = np.random.default_rng(0).normal(size=(7, 13)).astype(np.float32)
    trits, scales = absmean_ternarize(w, granularity)
    assert set(np.unique(trits)) <= {-1, 0, 1}
    ref_scale = np.abs(w).mean() if granularity == "tensor" else np.abs(w).mean(1)
    np.testing.assert_allclose(scales, np.atleast_1d(ref_scale), rtol=1e-6)
    for fmt in ("base3", "2bit"):
        t = TernaryTensor.from_float(w, fmt, granularity)
        assert np.array_equal(t.trits(), trits)
        expect = trits * (scales[0] if granularity == "tensor" else scales[:, None])
        np.testing.assert_allclose(t.dequantize(), expect, rtol=1e-6)
    assert TernaryTensor.from_float(w, "base3").nbytes() < TernaryTensor.from_float(w, "2bit").nbytes()
    assert 0 < sparsity(trits) < 1
