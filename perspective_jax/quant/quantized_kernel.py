"""A projection kernel kept in its exported GPTQ form (SPEC §3.4).

`QuantizedKernel` is a pytree that stands in for a float `kernel` parameter of a
`Projection` / `OutProjection` at inference: the engine puts it where the float
array would be, and the projection multiplies through
`kernels_pallas.group_matmul` — the weights stay 2–8 bit codes plus float16
per-group scales and zero points on the device (2.5 bits per weight at 2 bits,
group 64); the CPU decode path (≤ 4 rows) never forms a float copy of the
matrix, the others expand one block (CPU, many rows) or the whole matrix per
call (accelerators: no Pallas kernel for it yet).

    kernel shape (in_0, …, out_0, …)  ≡  matrix Ŵ [in, out]  (in = ∏ in axes)
    Ŵ[i, o] = (code[i, o] − zero[i // group_size, o]) · scale[i // group_size, o]
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from kernels_pallas.group_matmul import group_matmul


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
    codes: jax.Array            # uint8 [ceil(in / (8 // bits)), out]
    scales: jax.Array           # float16 [n_groups, out] (float32 from older exports)
    zeros: jax.Array            # float16 [n_groups, out], integer-valued
    shape: tuple = dataclasses.field(metadata={"static": True})   # the float kernel's
    n_in: int = dataclasses.field(metadata={"static": True})      # ∏ contracted axes
    bits: int = dataclasses.field(metadata={"static": True})
    group_size: int = dataclasses.field(metadata={"static": True})

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.scales.nbytes + self.zeros.nbytes)

    def contract(self, x: jax.Array, n_in_axes: int) -> jax.Array:
        """x [..., *in_shape] (the trailing `n_in_axes` axes contracted) → [..., *out_shape]."""
        lead, in_shape = x.shape[:x.ndim - n_in_axes], x.shape[x.ndim - n_in_axes:]
        if tuple(in_shape) != self.shape[:n_in_axes] or math.prod(in_shape) != self.n_in:
            raise ValueError(f"quantised kernel of shape {self.shape} cannot contract "
                             f"input axes {tuple(in_shape)}")
        y = group_matmul(x.reshape(-1, self.n_in), self.codes, self.scales, self.zeros,
                         self.bits, self.group_size)
        return y.reshape(*lead, *self.shape[n_in_axes:])


def from_quantized_matrix(q, kernel_shape) -> QuantizedKernel:
    """Wrap a `perspective_jax.quant.gptq.QuantizedMatrix` of a kernel of `kernel_shape`
    (numpy arrays; place them with `jax.device_put` afterwards)."""
    kernel_shape = tuple(int(s) for s in kernel_shape)
    n_in, n_out = q.shape
    if math.prod(kernel_shape) != n_in * n_out:
        raise ValueError(f"quantised matrix {q.shape} does not hold a kernel {kernel_shape}")
    if not any(math.prod(kernel_shape[:a]) == n_in for a in range(1, len(kernel_shape))):
        raise ValueError(f"no leading axes of {kernel_shape} have {n_in} elements")
    return QuantizedKernel(np.asarray(q.codes, np.uint8), np.asarray(q.scales),
                           np.asarray(q.zeros), kernel_shape, n_in, q.bits, q.group_size)
