"""One entry point for the PDR recurrence and its one `auto` rule (SPEC §3.1).

    y, S_T = pdr_scan(log_decay, k, q, v, state, impl="auto", chunk=16)

log_decay, v [B, T, d]; k, q [B, T, r]; state [B, d, r]. `impl` is one of
`PDR_IMPLS` (`perspective_jax.config.choices`): ``auto`` picks ``pallas`` on a
GPU where the kernel's tiles fit and elsewhere (CPU, TPU) ``matmul`` from d 256 up,
``chunked`` below (`resolve_impl`);
``chunked`` / ``matmul`` / ``scan`` / ``associative`` are the XLA forms of `pdr_xla`;
``pallas`` is `pdr_chunked` (compiled on a GPU — H100: 2.1× the chunked
forward, float64-exact — interpreted on CPU, for tests only).
"""

from __future__ import annotations

import jax

from kernels_pallas.pdr_chunked import pdr_pallas
from kernels_pallas.pdr_xla import (pdr_associative, pdr_chunked, pdr_chunked_matmul,
                                    pdr_sequential, pdr_step)
from perspective_jax.config.choices import PDR_IMPLS

__all__ = ["pdr_scan", "pdr_step", "resolve_impl", "pallas_block_d", "PDR_IMPLS"]


def pallas_block_d(d: int, r: int, chunk: int):
    """Row block for the Pallas kernel compiled on a GPU, or None where it cannot run:
    Triton tiles are powers of two and its dots need ≥ 16 along M and K. 32 rows was
    fastest on an H100 (d 256, r 64: 0.12 ms vs 0.17 at 64, 0.28 at 128, XLA 0.25)."""
    def pow2(n):
        return n > 0 and n & (n - 1) == 0
    if not (pow2(r) and r >= 16 and pow2(chunk) and chunk >= 16):
        return None
    return next((bd for bd in (32, 16) if d % bd == 0), None)


MATMUL_MIN_D = 256   # CPU: the matmul-shaped chunk wins from here on (docs/benchmarks.md)


def resolve_impl(impl: str, d: int, r: int, chunk: int, sub: int = 4) -> str:
    """``auto`` → ``pallas`` on a GPU where the kernel's tiles fit; elsewhere ``matmul``
    for d ≥ 256 (fwd+bwd 1.1–1.9× faster than ``chunked`` at d 256, r 64, T 1024 on
    2 CPU cores) when `sub` divides `chunk`, else ``chunked`` (faster at d 128)."""
    if impl != "auto":
        return impl
    if jax.default_backend() == "gpu" and pallas_block_d(d, r, chunk):
        return "pallas"
    return "matmul" if d >= MATMUL_MIN_D and chunk % sub == 0 else "chunked"


def pdr_scan(log_decay, k, q, v, state, *, impl: str = "auto", chunk: int = 16,
             sub: int = 4):
    """Dispatch to one PDR implementation; all return (y, final_state). `sub`: the
    diagonal block of ``matmul`` (divides `chunk`)."""
    d, r = v.shape[-1], k.shape[-1]
    impl = resolve_impl(impl, d, r, chunk, sub)
    if impl == "chunked":
        return pdr_chunked(log_decay, k, q, v, state, chunk=chunk)
    if impl == "matmul":
        return pdr_chunked_matmul(log_decay, k, q, v, state, chunk=chunk, sub=sub)
    if impl == "scan":
        return pdr_sequential(log_decay, k, q, v, state)
    if impl == "associative":
        return pdr_associative(log_decay, k, q, v, state)
    if impl == "pallas":  # the Pallas kernel (interpreted on CPU)
        on_cpu = jax.default_backend() == "cpu"
        block_d = (d if d <= 128 or d % 128 else 128) if on_cpu else pallas_block_d(d, r, chunk)
        if block_d is None:
            raise ValueError(f"the Pallas PDR kernel needs a power-of-two rank ≥ 16 and "
                             f"chunk ≥ 16 and d divisible by 16 on a GPU (d={d}, r={r}, "
                             f"chunk={chunk}); use model.pdr_impl=chunked")
        return pdr_pallas(log_decay, k, q, v, state, chunk=chunk, block_d=block_d,
                          interpret=on_cpu)
    raise ValueError(f"unknown PDR implementation {impl!r}; use one of {PDR_IMPLS}")
