"""Calibration and 2-bit GPTQ quantisation of the model's shared kernels (SPEC §3.4).

Shared kernels are the `Projection` / `OutProjection` kernels of the model — the
PDR mixer's w_k, w_q, w_v, w_o; the attention's w_q, w_k, w_v, w_o; the dense
SwiGLU FFNs' w_gate, w_up, w_down — and the PDR decay projection w_p (a raw
param of the mixer, `periods/P/layer_i/mixer/w_p`, whose input is w_k's, so it
shares w_k's Hessian): SPEC §3.4 quantises every shared matrix to 2 bits, and
the budget (`perspective-budget`) counts them so. Not included: routed experts
(`ffn/w_gate|w_up|w_down` of routed layers are raw params, not Projections),
the embedding, norms, the decay bias b_p and routers.

Key-path scheme: the parameter path with the period index inserted after
"periods", '/'-joined, e.g.

    periods/3/layer_0/mixer/w_q/kernel
      ↔ params["periods"]["layer_0"]["mixer"]["w_q"]["kernel"][3]

Every kernel is quantised as a 2-D matrix [in, out]: in = product of the
leading axes the layer contracts (one axis for a Projection [in, *features],
n_in axes for an OutProjection [*in_shape, out]), found as the shortest leading
prefix of the kernel shape whose product equals the Hessian size; out = the
product of the remaining axes. The
original shape is stored beside the codes as `<path>.orig_shape`.

Calibration runs the model period by period (one jitted `Period` apply, reused
for every period's parameter slice); `flax.linen.intercept_methods` returns
the input of every Projection/OutProjection call as an extra output — once per
distinct input, so kernels reading the same activations share one Hessian — and
the Hessians are accumulated from those values in float64 numpy; the forward
pass is the same computation `PerspectiveLM` performs (embedding · √d, default
segment positions 0 … T−1, no cache).
"""

from __future__ import annotations

import functools
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.config import ModelConfig, MoEConfig
from perspective_jax.quant import gptq
from perspective_jax.model.layers import OutProjection, Projection, dtype_of
from perspective_jax.model.pdr import PDRMixer
from perspective_jax.model.transformer import Period, embed_tokens


def _unbox(tree):
    return jax.tree.map(lambda a: getattr(a, "value", a), tree,
                        is_leaf=lambda a: hasattr(a, "value"))


def _period_slice(periods, p: int):
    return jax.tree.map(lambda a: a[p], periods)


def _period_with_inputs(cfg: ModelConfig, moe: MoEConfig, segment_pos, owner: dict):
    """run(period_params, x) → (y, {kernel path in the period: its input [N, in]}) with
    one entry per distinct input: kernels fed the same array (attention's w_q, w_k,
    w_v; the PDR mixer's w_k, w_q, w_v and w_p; a SwiGLU's w_gate and w_up) appear
    once, and `owner` — filled while tracing — maps every kernel path to the path
    whose entry holds its input."""
    period = Period(cfg, moe)

    def run(period_params, x):
        # Runs at trace time: the interceptor collects each layer input as an
        # extra output of the jitted function (one compile serves all periods).
        inputs, first, alive = {}, {}, []

        def put(path, inp, n_in):
            alive.append(inp)                 # keeps id() unique while tracing
            key = (id(inp), n_in)
            owner[path] = first.setdefault(key, path)
            if owner[path] == path:
                inputs[path] = inp.reshape(-1, math.prod(inp.shape[inp.ndim - n_in:]))

        def record(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name == "__call__" and isinstance(mod, (Projection, OutProjection)):
                n_in = 1
                if isinstance(mod, OutProjection):
                    n_in = kwargs["n_in"] if "n_in" in kwargs else args[1]
                put("/".join((*mod.scope.path, "kernel")), args[0], n_in)
                if isinstance(mod.parent, PDRMixer) and mod.name == "w_k":
                    # W_p (a raw param of the mixer) sees the same input as W_k
                    put("/".join((*mod.parent.scope.path, "w_p")), args[0], n_in)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            y, _ = period.apply({"params": period_params}, x, segment_pos, None)
        return y, inputs

    return run


@functools.lru_cache(maxsize=8)
def _kernel_inputs(cfg: ModelConfig, moe: MoEConfig):
    """(abstract periods, {kernel path: path of its input's entry}, {entry: input width})
    of one period — shapes only (jax.eval_shape), no weights or compute."""
    from perspective_jax.model.transformer import abstract_params
    periods = abstract_params(cfg, moe)["periods"]
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), periods)
    x = jax.ShapeDtypeStruct((1, 1, cfg.d_model), dtype_of(cfg.dtype))
    owner: dict = {}
    run = _period_with_inputs(cfg, moe, jnp.zeros((1, 1), jnp.int32), owner)
    _, inputs = jax.eval_shape(run, one, x)
    return periods, owner, {src: inp.shape[1] for src, inp in inputs.items()}


def shared_kernel_widths(cfg: ModelConfig, moe: MoEConfig) -> dict:
    """{kernel path within a period ('layer_0/mixer/w_q/kernel'): input width} of every
    shared kernel — shapes only (jax.eval_shape), no weights or compute."""
    _, owner, widths = _kernel_inputs(cfg, moe)
    return {path: widths[src] for path, src in owner.items()}


def shared_shapes(cfg: ModelConfig, moe: MoEConfig) -> tuple[tuple, tuple]:
    """(widths of one period's distinct shared-kernel inputs, (in, out) of each of its
    shared kernels) — shapes only, for memory estimates."""
    periods, owner, widths = _kernel_inputs(cfg, moe)
    kernels = []
    for path, src in sorted(owner.items()):
        node = periods
        for name in path.split("/"):
            node = node[name]
        kernels.append((widths[src], math.prod(node.shape[1:]) // widths[src]))
    return tuple(widths.values()), tuple(kernels)


def rtn_quantize_shared(params, widths: dict, n_periods: int, bits: int = 2,
                        group_size: int = 64) -> dict:
    """Round-to-nearest group-wise codes of every shared kernel (no calibration; for
    synthetic models) in `quantize_shared`'s tensor format."""
    params = _unbox(params)
    tensors = {}
    for p in range(n_periods):
        for name, n_in in sorted(widths.items()):
            path = f"periods/{p}/{name}"
            kernel = np.asarray(_param_at(params, path), np.float32)
            q = gptq.rtn_quantize(_as_matrix(kernel, n_in, path), bits, group_size)
            tensors.update(gptq.kernel_tensors(q, path, kernel.shape))
    return tensors


def period_input(cfg: ModelConfig, params, tokens):
    """tokens [B, T] → the first period's input [B, T, d] as `PerspectiveLM` computes it
    (embedding · √d in cfg.dtype); `params` needs only its "embed" entry."""
    x = embed_tokens(cfg, params, jnp.asarray(tokens, jnp.int32))
    return x.astype(dtype_of(cfg.dtype)) * math.sqrt(cfg.d_model)


class HessianPass:
    """Shared-kernel Hessians over calibration `tokens` [B, T], one period at a time:

        hp = HessianPass(cfg, moe, {"embed": ...}, tokens)
        for p in range(n_periods):
            H = hp.period(p, period_params)   # {periods/p/<kernel path>: H [in, in]}

    `period` advances the activations through period p (its parameters, unstacked)."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, params, tokens):
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
        b, t = tokens.shape
        self.x = period_input(cfg, _unbox(params), tokens)
        segment_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
        self.owner: dict = {}
        self._run = jax.jit(_period_with_inputs(cfg, moe, segment_pos, self.owner))

    def compile(self, period_like) -> None:
        """Compile the period's program now (`period_like`: ShapeDtypeStructs)."""
        self._run.lower(period_like, jax.ShapeDtypeStruct(self.x.shape, self.x.dtype)).compile()

    def period(self, p: int, period_params) -> dict:
        self.x, inputs = self._run(_unbox(period_params), self.x)
        value = {name: gptq.hessian_from_inputs(np.asarray(jnp.asarray(inp, jnp.float32),
                                                           np.float64))
                 for name, inp in inputs.items()}
        return {f"periods/{p}/{name}": value[src] for name, src in self.owner.items()}


def shared_linear_hessians(cfg: ModelConfig, moe: MoEConfig, params, tokens) -> dict:
    """{path: H [in, in] float64} of every shared kernel's inputs over `tokens` [B, T].
    Kernels that read the same input share one Hessian object (computed once): at
    the 1.05T scale that is ~43 GB of float64 instead of ~76 GB."""
    params = _unbox(params)
    hp = HessianPass(cfg, moe, params, tokens)
    out: dict[str, np.ndarray] = {}
    for p in range(cfg.n_periods):
        out.update(hp.period(p, _period_slice(params["periods"], p)))
    return out


def _param_at(params, path: str):
    parts = path.split("/")
    if len(parts) < 3 or parts[0] != "periods":
        raise ValueError(f"bad shared-kernel path {path!r}; expected periods/<p>/.../kernel")
    node = params["periods"]
    for name in parts[2:]:
        node = node[name]
    return node[int(parts[1])]


def _as_matrix(kernel: np.ndarray, n_in: int, path: str) -> np.ndarray:
    shape = kernel.shape
    for k in range(1, len(shape)):
        if math.prod(shape[:k]) == n_in:
            return kernel.reshape(n_in, -1)
    raise ValueError(f"{path}: kernel shape {shape} has no leading axes of size {n_in}")


def _rel_output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """‖X(W − Ŵ)‖_F / ‖XW‖_F = sqrt(tr(ΔᵀHΔ) / tr(WᵀHW))."""
    d = w - w_hat
    num = float(np.sum(d * (h @ d)))
    den = float(np.sum(w * (h @ w)))
    return math.sqrt(max(num, 0.0) / den) if den > 0 else math.sqrt(max(num, 0.0))


def quantize_shared(params, hessians: dict, bits: int = 2, group_size: int = 64,
                    damp: float = 0.01, block_size: int = 128):
    """GPTQ every kernel in `hessians` → (tensors, report).

    tensors: `gptq.kernel_tensors` entries under each path (codes + `<path>.orig_shape`);
    report: [(path, rel_error_gptq, rel_error_rtn)], the relative layer-output
    errors ‖X(W − Ŵ)‖/‖XW‖ on the calibration inputs."""
    params = _unbox(params)
    return quantize_kernels(lambda path: _param_at(params, path), hessians, bits,
                            group_size, damp, block_size)


def quantize_kernels(kernel_at, hessians: dict, bits: int = 2, group_size: int = 64,
                     damp: float = 0.01, block_size: int = 128):
    """`quantize_shared` with the kernels given by `kernel_at(path)` (paths in sorted
    order, one kernel at a time)."""
    tensors, report = {}, []
    for path in sorted(hessians):
        h = np.asarray(hessians[path], np.float64)
        kernel = np.asarray(jnp.asarray(kernel_at(path), jnp.float32), np.float64)
        w = _as_matrix(kernel, h.shape[0], path)
        q = gptq.gptq_quantize(w, h, bits, group_size, damp, block_size)
        rtn = gptq.rtn_quantize(w, bits, group_size)
        tensors.update(gptq.kernel_tensors(q, path, kernel.shape))
        report.append((path, _rel_output_error(w, gptq.dequantize(q), h),
                       _rel_output_error(w, gptq.dequantize(rtn), h)))
    return tensors, report


def kernel_specs(path: str, kernel_shape, n_in: int, bits: int, group_size: int) -> dict:
    """{tensor key: (dtype, shape)} that `quantize_kernels` writes for the kernel at
    `path` of `kernel_shape` (read off a one-column stand-in: no weights needed)."""
    out = math.prod(kernel_shape) // n_in
    q = gptq.rtn_quantize(np.zeros((n_in, 1)), bits, group_size)
    specs = {}
    for key, value in gptq.kernel_tensors(q, path, kernel_shape).items():
        shape = value.shape
        if key.rsplit(".", 1)[1] in ("codes", "scales", "zeros"):   # [rows, out]
            shape = (*shape[:-1], out)
        specs[key] = (value.dtype, shape)
    return specs


def dequantize_shared(tensors: dict) -> dict:
    """{path: float32 kernel in its original shape} from `quantize_shared` tensors."""
    return {path: gptq.dequantize(q).reshape(shape)
            for path, (q, shape) in gptq.read_kernels(tensors).items()}


def replace_shared(params, kernels: dict):
    """A copy of `params` (unboxed) with the per-period shared kernels replaced."""
    params = flax.core.unfreeze(_unbox(params))   # fresh nested dicts, same leaves
    for path, value in kernels.items():
        parts = path.split("/")
        node = params["periods"]
        for name in parts[2:-1]:
            node = node[name]
        stacked = node[parts[-1]]
        node[parts[-1]] = stacked.at[int(parts[1])].set(jnp.asarray(value, stacked.dtype))
    return params
