"""Pallas kernels (interpret mode on CPU) and their XLA paths against references."""

import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.ternary_matmul import IMPLS, pack_rows_2bit, ternary_matmul


@pytest.mark.parametrize("m,k,n", [(1, 64, 128), (3, 37, 19), (5, 37, 19), (8, 12, 7), (70, 96, 200)])
def test_ternary_matmul_matches_float64_reference(m, k, n):
    rng = np.random.default_rng(m + k + n)
    trits = rng.integers(-1, 2, (k, n)).astype(np.int8)
    x = rng.normal(size=(m, k)).astype(np.float32)
    scale = np.float32(0.37)
    ref = (x.astype(np.float64) @ trits.astype(np.float64)) * scale
    packed = jnp.asarray(pack_rows_2bit(trits))
    for impl in IMPLS:
        out = ternary_matmul(jnp.asarray(x), packed, scale, impl=impl, interpret=True)
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-4, err_msg=impl)


@pytest.mark.parametrize("fused_max_rows", [0, 8])
@pytest.mark.parametrize("m,k,n", [(1, 150, 33), (6, 301, 7)])
def test_ternary_matmul_xla_fused_and_dot_paths_match_reference(m, k, n, fused_max_rows):
    """Both CPU paths, K not a multiple of 4 nor of the block, N odd."""
    from kernels_pallas.ternary_matmul import ternary_matmul_reference, ternary_matmul_xla
    rng = np.random.default_rng(m * k + n)
    packed = jnp.asarray(pack_rows_2bit(rng.integers(-1, 2, (k, n)).astype(np.int8)))
    x = jnp.asarray(rng.normal(size=(m, k)).astype(np.float32))
    scale = jnp.asarray(rng.uniform(0.5, 1.5, n).astype(np.float32))
    out = ternary_matmul_xla(x, packed, scale, fused_max_rows=fused_max_rows,
                             fused_block=8, dot_block=16)
    np.testing.assert_allclose(np.asarray(out), ternary_matmul_reference(x, packed, scale),
                               rtol=1e-5, atol=1e-4)


def test_all_zero_ternary_weights_give_zero():
    x = jnp.ones((3, 16))
    packed = jnp.asarray(pack_rows_2bit(np.zeros((16, 8), np.int8)))
    for impl in IMPLS:
        assert float(jnp.abs(ternary_matmul(x, packed, 1.0, impl=impl, interpret=True)).max()) == 0


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="packed must be"):
        ternary_matmul(jnp.ones((2, 16)), jnp.zeros((3, 8), jnp.uint8), 1.0)


def test_pdr_pallas_kernel_matches_reference_values_and_gradients():
    import jax
    from kernels_pallas.pdr_chunked import pdr_pallas
    from kernels_pallas.pdr_xla import pdr_sequential
    rng = np.random.default_rng(0)
    b, t, d, r = 2, 37, 16, 4
    lam = jnp.asarray(-np.logaddexp(0, -rng.uniform(-4, 4, (b, t, d))), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, r)) / 2, jnp.float32)
    q = jnp.asarray(rng.normal(size=(b, t, r)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    s0 = jnp.asarray(rng.normal(size=(b, d, r)), jnp.float32)
    y_ref, s_ref = pdr_sequential(lam, k, q, v, s0)
    y, s = pdr_pallas(lam, k, q, v, s0, chunk=8, block_d=8, interpret=True)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(s), np.asarray(s_ref), atol=2e-5, rtol=1e-5)

    cot = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)

    def loss(fn, *args):
        y, s = fn(*args)
        return jnp.sum(y * cot) + jnp.sum(s)

    kern = lambda *a: pdr_pallas(*a, chunk=8, block_d=8, interpret=True)
    g = jax.grad(lambda *a: loss(kern, *a), argnums=(0, 1, 2, 3, 4))(lam, k, q, v, s0)
    g_ref = jax.grad(lambda *a: loss(pdr_sequential, *a), argnums=(0, 1, 2, 3, 4))(
        lam, k, q, v, s0)
    for a, ref in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(ref), atol=1e-4, rtol=1e-4)


def test_default_impl_per_backend_and_rows(monkeypatch):
    import kernels_pallas.ternary_matmul as tm
    assert tm.default_impl(1) == tm.default_impl(512) == "xla"          # this CPU
    monkeypatch.setattr(tm.jax, "default_backend", lambda: "gpu")
    assert tm.default_impl(1) == tm.default_impl(tm.DEQUANT_MIN_ROWS - 1) == "pallas"
    assert tm.default_impl(tm.DEQUANT_MIN_ROWS) == "dequant"


def test_dequant_path_in_blocks_matches_and_bounds_its_temporary():
    """Above `block_bytes` the dequant path decodes blocks of packed rows: same values,
    and XLA's own count of its temporaries stays far below the whole float matrix."""
    import jax
    from kernels_pallas.ternary_matmul import ternary_matmul_dequant, ternary_matmul_reference
    rng = np.random.default_rng(3)
    k, n = 1030, 1200                      # K not a multiple of 4 nor of the block
    packed = jnp.asarray(pack_rows_2bit(rng.integers(-1, 2, (k, n)).astype(np.int8)))
    x = jnp.asarray(rng.normal(size=(20, k)).astype(np.float32))
    scale = jnp.asarray(rng.uniform(0.5, 1.5, n).astype(np.float32))
    ref = ternary_matmul_reference(x, packed, scale)
    whole = 4 * packed.shape[0] * 4 * n                      # the float matrix, bytes
    for block in (whole, whole // 7, 1):
        out = ternary_matmul_dequant(x, packed, scale, block_bytes=block)
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-4)
    temp = lambda b: jax.jit(ternary_matmul_dequant, static_argnums=3).lower(  # noqa: E731
        x, packed, scale, b).compile().memory_analysis().temp_size_in_bytes
    assert temp(whole) >= 4 * k * n and temp(whole // 16) < whole / 4
