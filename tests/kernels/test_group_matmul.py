"""Group-wise quantised matmul and quantised projections vs float64 references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.group_matmul import group_matmul
from perspective_jax.config import ModelConfig
from perspective_jax.quant import gptq
from perspective_jax.model.layers import OutProjection, Projection
from perspective_jax.quant.quantized_kernel import QuantizedKernel, from_quantized_matrix


def _case(n_in, n_out, rows, bits, group_size, seed=0):
    rng = np.random.default_rng(seed)
    q = gptq.rtn_quantize(rng.standard_normal((n_in, n_out)).astype(np.float32),
                          bits, group_size)
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    want = x.astype(np.float64) @ gptq.dequantize(q).astype(np.float64)
    return q, x, want


@pytest.mark.parametrize("impl", ["xla", "dequant", "reference"])
@pytest.mark.parametrize("n_in,n_out,rows,bits,group_size", [
    (256, 40, 1, 2, 64),      # decode row, whole groups
    (100, 17, 3, 3, 32),      # 3-bit (2 codes per byte), ragged last group
    (96, 33, 7, 4, 16),       # many rows: the decode-to-block + matmul path
    (130, 9, 2, 8, 64),       # 8-bit, input not a multiple of the group
    (50, 11, 1, 2, 6),        # group not a multiple of 4 codes per byte: dequant
    (64, 20, 5, 4, 128),      # one group wider than the input
    (2100, 24, 9, 2, 64),     # several blocks on the many-row path
])
def test_group_matmul_matches_float64(impl, n_in, n_out, rows, bits, group_size):
    q, x, want = _case(n_in, n_out, rows, bits, group_size)
    fn = jax.jit(lambda *a: group_matmul(*a, bits, group_size, impl=impl))
    got = np.asarray(fn(x, q.codes, q.scales, q.zeros))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_group_matmul_rejects_mismatched_shapes():
    q, x, _ = _case(64, 8, 1, 2, 16)
    with pytest.raises(ValueError, match="do not match"):
        group_matmul(x[:, :60], q.codes, q.scales, q.zeros, 2, 16)
    with pytest.raises(ValueError, match="bits must be"):
        group_matmul(x, q.codes, q.scales, q.zeros, 5, 16)
    with pytest.raises(ValueError, match="unknown group_matmul impl"):
        group_matmul(x, q.codes, q.scales, q.zeros, 2, 16, impl="cuda")
    assert group_matmul(x[:0], q.codes, q.scales, q.zeros, 2, 16).shape == (0, 8)


def test_group_parameters_are_float16_and_float32_ones_still_work():
    q, x, want = _case(128, 12, 2, 2, 32)
    assert q.scales.dtype == q.zeros.dtype == np.float16
    wide = (q.scales.astype(np.float32), q.zeros.astype(np.float32))
    got = group_matmul(x, q.codes, *wide, 2, 32)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def _quantized_params(module, x, bits, group_size, *args):
    """Float params of `module` and the same with its kernel GPTQ/RTN-quantised."""
    params = module.init(jax.random.key(1), x, *args)["params"]
    kernel = np.asarray(nn.unbox(params["kernel"]))
    n_in = x.shape[-1] if not args else int(np.prod(x.shape[-args[0]:]))
    q = gptq.rtn_quantize(kernel.reshape(n_in, -1), bits, group_size)
    deq = gptq.dequantize(q).reshape(kernel.shape)
    qk = jax.device_put(from_quantized_matrix(q, kernel.shape))
    return {"kernel": jnp.asarray(deq)}, {"kernel": qk}


@pytest.mark.parametrize("bits,group_size", [(2, 16), (4, 8), (8, 32)])
def test_projection_with_quantized_kernel_equals_dequantised(bits, group_size):
    cfg = ModelConfig()
    x = jax.random.normal(jax.random.key(0), (2, 3, 48))
    proj = Projection((4, 6), ("embed", "heads", "kv"), cfg)
    deq, quant = _quantized_params(proj, x, bits, group_size)
    assert isinstance(quant["kernel"], QuantizedKernel)
    want = proj.apply({"params": deq}, x)
    got = jax.jit(lambda p, x: proj.apply({"params": p}, x))(quant, x)
    assert got.shape == want.shape == (2, 3, 4, 6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    out = OutProjection(20, ("heads", "kv", "embed"), cfg)
    h = jax.random.normal(jax.random.key(2), (2, 3, 4, 6))
    deq, quant = _quantized_params(out, h, bits, group_size, 2)
    want = out.apply({"params": deq}, h, 2)
    got = out.apply({"params": quant}, h, 2)
    assert got.shape == want.shape == (2, 3, 20)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_quantized_kernel_rejects_wrong_input_axes():
    q = gptq.rtn_quantize(np.ones((24, 5), np.float32), 2, 8)
    qk = from_quantized_matrix(q, (4, 6, 5))
    assert qk.n_in == 24 and qk.nbytes == q.codes.nbytes + q.scales.nbytes + q.zeros.nbytes
    with pytest.raises(ValueError, match="cannot contract"):
        qk.contract(jnp.ones((1, 6, 4)), 2)
    with pytest.raises(ValueError, match="does not hold"):
        from_quantized_matrix(q, (4, 6, 6))
