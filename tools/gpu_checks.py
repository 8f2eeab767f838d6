"""Accelerator checks: Pallas kernels compiled for the device, expert transfer and FFN.

Runs on whatever backend jax picks (meant for a GPU; on CPU the Pallas kernels
run in interpret mode and the timings mean little). Sections, each isolated so a
failure in one is reported and the rest still run:

  ternary   `ternary_matmul` Pallas kernel (compiled) vs a float64 numpy reference
            (‖out − ref‖ / ‖ref‖), and median times of: pallas, the XLA decode loop,
            decode-to-float32 + dot ("dequant": in blocks of at most DEQUANT_BLOCK_BYTES,
            and "decode_dot_whole" in one step), the `auto` choice, dense float32 and
            bf16 matmuls; at 1 row a sweep of the kernel's block sizes.
  shared    2-bit GPTQ shared-weight `group_matmul` (dequant, xla loop, auto) vs a
            float64 reference, and the float32 / bf16 matmuls it replaces.
  pdr       `pdr_pallas` vs the XLA chunked form: values,
            final state and gradients; forward times of both.
  transfer  one *full* expert-layer of a config (3 × d_model × d_ff 2-bit codes)
            host → device: from pinned_host memory and from a numpy array; vs the
            SPEC §3.5 model (27.05 MB base-3 over 7 GB/s PCIe = 3.86 ms).
  staging   one region read from disk to the device: staged through pinned_host
            memory vs sent straight from the read buffer (what the engine does).
  ffn       the ternary SwiGLU of one expert at batch 1 on the device, as the
            streaming engine runs it (`infer.compute.expert_rows`), vs SPEC's 0.14 ms.

    python tools/gpu_checks.py [--config curricula/perspective-1t.yaml] [--out DIR]
        [--sections ternary,shared,pdr,transfer,staging,ffn] [--quick]

Prints a table per section; writes every number to DIR/gpu_checks.json (default
DIR: $OUT if set, else docs/device_runs/YYYY-MM-DD-BACKEND/, next to earlier runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

SPEC_TRANSFER_MS = 3.86       # SPEC §3.5 model: one full expert-layer over PCIe
SPEC_FFN_MS = 0.14            # SPEC §3.5 model: ternary FFN of one expert
SPEC_BASE3_BYTES = 27.05e6    # SPEC §3.5: one expert-layer packed base-3
ON_CPU = jax.default_backend() == "cpu"   # Pallas only interprets there (smoke run)


def timed(fn, *args, reps: int = 20, rounds: int = 5) -> float:
    """Median over `rounds` of (time of `reps` back-to-back calls) / reps, in ms;
    two warm-up calls first (compilation excluded)."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            r = fn(*args)
        jax.block_until_ready(r)
        out.append((time.perf_counter() - t0) / reps * 1e3)
    return statistics.median(out)


def rel_err(out, ref) -> float:
    out = np.asarray(out, np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def section_ternary(args, rng) -> dict:
    from kernels_pallas.ternary_matmul import (default_impl, pack_rows_2bit, ternary_matmul,
                                               ternary_matmul_dequant, ternary_matmul_pallas,
                                               ternary_matmul_xla)
    shapes = [(256, 384)] if ON_CPU else [(4096, 4096), (4096, 11008), (11008, 4096)]
    rows = [1, 64] if args.quick else [1, 16, 256]
    results = []
    for k, n in shapes:
        trits = rng.integers(-1, 2, (k, n)).astype(np.int8)
        packed = jnp.asarray(pack_rows_2bit(trits))
        dense32 = jnp.asarray(trits, jnp.float32)
        dense16 = jnp.asarray(trits, jnp.bfloat16)
        for m in rows:
            x = rng.standard_normal((m, k)).astype(np.float32)
            ref = x.astype(np.float64) @ trits.astype(np.float64) * 0.5
            xj = jnp.asarray(x)
            row = {"m": m, "k": k, "n": n}
            pallas = jax.jit(lambda a, p: ternary_matmul_pallas(a, p, 0.5, interpret=ON_CPU))
            xla = jax.jit(lambda a, p: ternary_matmul_xla(a, p, 0.5))
            deq = jax.jit(lambda a, p: ternary_matmul_dequant(a, p, 0.5))   # blocked
            whole = jax.jit(lambda a, p: ternary_matmul_dequant(a, p, 0.5, block_bytes=1 << 40))
            for name, fn, w in (("pallas", pallas, packed), ("xla_loop", xla, packed),
                                ("decode_dot", deq, packed), ("decode_dot_whole", whole, packed)):
                try:
                    row[f"{name}_err"] = rel_err(fn(xj, w), ref)
                    row[f"{name}_ms"] = timed(fn, xj, w)
                except Exception as e:  # noqa: BLE001 - report and go on
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            if m < 16 and not ON_CPU:          # Pallas block sweep for decode rows
                for bn in (16, 32, 64):
                    for bk in (32, 64):
                        f = jax.jit(lambda a, p, bn=bn, bk=bk: ternary_matmul_pallas(
                            a, p, 0.5, block_n=bn, block_k=bk))
                        row[f"pallas_n{bn}_k{bk}_err"] = rel_err(f(xj, packed), ref)
                        row[f"pallas_n{bn}_k{bk}_ms"] = timed(f, xj, packed)
            auto = jax.jit(lambda a, p: ternary_matmul(a, p, 0.5))
            row["auto_impl"] = default_impl(m)
            row["auto_err"] = rel_err(auto(xj, packed), ref)
            row["auto_ms"] = timed(auto, xj, packed)
            row["dense_f32_ms"] = timed(jax.jit(lambda a, w: a @ w), xj, dense32)
            row["dense_bf16_ms"] = timed(jax.jit(lambda a, w: a @ w),
                                         xj.astype(jnp.bfloat16), dense16)
            results.append(row)
            print(json.dumps(row), flush=True)
    return {"rows": results}


def section_shared(args, rng) -> dict:
    """2-bit GPTQ shared-weight matmul (`group_matmul`, group 64): error vs float64 and
    time of each impl against the float32 / bf16 matrix it replaces."""
    from kernels_pallas.group_matmul import default_impl, group_matmul
    from perspective_jax.quant import gptq
    shapes = [(256, 384)] if ON_CPU else [(4096, 4096), (4096, 11008), (11008, 4096)]
    results = []
    for k, n in shapes:
        q = gptq.rtn_quantize(rng.standard_normal((k, n)).astype(np.float32), 2, 64)
        w64 = gptq.dequantize(q).astype(np.float64)
        parts = [jnp.asarray(a) for a in (q.codes, q.scales, q.zeros)]
        dense32 = jnp.asarray(w64, jnp.float32)
        for m in ([1, 64] if args.quick else [1, 16, 256]):
            x = rng.standard_normal((m, k)).astype(np.float32)
            ref, xj = x.astype(np.float64) @ w64, jnp.asarray(x)
            row = {"m": m, "k": k, "n": n, "auto_impl": default_impl(2, 64)}
            for impl in ("dequant", "xla", None):
                name = impl or "auto"
                fn = jax.jit(lambda a, c, s_, z, impl=impl: group_matmul(a, c, s_, z, 2, 64,
                                                                         impl=impl))
                try:
                    row[f"{name}_err"] = rel_err(fn(xj, *parts), ref)
                    row[f"{name}_ms"] = timed(fn, xj, *parts)
                except Exception as e:  # noqa: BLE001 - report and go on
                    row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            row["dense_f32_ms"] = timed(jax.jit(lambda a, w: a @ w), xj, dense32)
            row["dense_bf16_ms"] = timed(jax.jit(lambda a, w: a @ w), xj.astype(jnp.bfloat16),
                                         dense32.astype(jnp.bfloat16))
            results.append(row)
            print(json.dumps(row), flush=True)
    return {"rows": results}


def section_pdr(args, rng) -> dict:
    from kernels_pallas.pdr_chunked import pdr_pallas
    from kernels_pallas.pdr_xla import pdr_chunked
    out = []
    for b, t, d, r in ([(2, 256, 256, 64)] if args.quick else [(2, 256, 256, 64),
                                                              (1, 1024, 512, 64)]):
        lam = jnp.asarray(np.log(rng.uniform(0.02, 0.95, (b, t, d))), jnp.float32)
        k = jnp.asarray(rng.standard_normal((b, t, r)) / np.sqrt(r), jnp.float32)
        q = jnp.asarray(rng.standard_normal((b, t, r)) / np.sqrt(r), jnp.float32)
        v = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
        s0 = jnp.asarray(rng.standard_normal((b, d, r)) * 0.1, jnp.float32)
        row = {"b": b, "t": t, "d": d, "r": r}
        fx = jax.jit(lambda *a: pdr_chunked(*a))
        fp = jax.jit(lambda *a: pdr_pallas(*a, interpret=ON_CPU))
        try:
            y_x, s_x = fx(lam, k, q, v, s0)
            y_p, s_p = fp(lam, k, q, v, s0)
            row["y_err"] = rel_err(y_p, np.asarray(y_x, np.float64))
            row["state_err"] = rel_err(s_p, np.asarray(s_x, np.float64))
            y64, s64 = _pdr_float64(*(np.asarray(a, np.float64) for a in (lam, k, q, v, s0)))
            row["pallas_vs_f64_y"], row["xla_vs_f64_y"] = rel_err(y_p, y64), rel_err(y_x, y64)
            row["pallas_vs_f64_state"] = rel_err(s_p, s64)
            row["xla_vs_f64_state"] = rel_err(s_x, s64)

            def loss(fn):
                return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)[0] ** 2) + jnp.sum(fn(*a)[1]),
                                        argnums=(0, 1, 2, 3, 4)))
            gx = loss(lambda *a: pdr_chunked(*a))(lam, k, q, v, s0)
            gp = loss(lambda *a: pdr_pallas(*a, interpret=ON_CPU))(lam, k, q, v, s0)
            row["grad_err_max"] = max(rel_err(a, np.asarray(b_, np.float64))
                                      for a, b_ in zip(gp, gx))
            row["xla_ms"] = timed(fx, lam, k, q, v, s0)
            row["pallas_ms"] = timed(fp, lam, k, q, v, s0)
            for bd in (32, 64):        # smaller row blocks: less register pressure
                fb = jax.jit(lambda *a, bd=bd: pdr_pallas(*a, block_d=bd,
                                                               interpret=ON_CPU))
                row[f"pallas_bd{bd}_err"] = rel_err(fb(lam, k, q, v, s0)[0],
                                                    np.asarray(y_x, np.float64))
                row[f"pallas_bd{bd}_ms"] = timed(fb, lam, k, q, v, s0)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        out.append(row)
        print(json.dumps(row), flush=True)
    return {"rows": out}


def _pdr_float64(lam, k, q, v, s):
    """Sequential float64 PDR: S_t = diag(exp λ_t) S_{t-1} + v_t k_tᵀ; y_t = S_t q_t."""
    y = np.zeros_like(v)
    s = s.copy()
    for t in range(v.shape[1]):
        s = np.exp(lam[:, t])[:, :, None] * s + v[:, t, :, None] * k[:, t, None, :]
        y[:, t] = np.einsum("bdr,br->bd", s, q[:, t])
    return y, s


def _model_cfg(path: str):
    from perspective_jax.config import load_config
    return load_config(path, []).model


def section_transfer(args, rng) -> dict:
    from perspective_jax.infer.device_slots import memory_sharding
    from perspective_jax.modeldir.format import RegionLayout
    cfg = _model_cfg(args.config)
    layout = RegionLayout(cfg.d_model, cfg.d_ff)
    region = rng.integers(0, 256, layout.nbytes, dtype=np.uint8)
    dev = jax.devices()[0]
    kinds = sorted(m.kind for m in dev.addressable_memories())
    to_dev = memory_sharding(dev, "device")
    pinned = memory_sharding(dev, "pinned_host")
    host = jax.device_put(region, pinned).block_until_ready()
    res = {"d_model": cfg.d_model, "d_ff": cfg.d_ff, "region_bytes": layout.nbytes,
           "memory_kinds": kinds, "host_kind": pinned.memory_kind}
    res["pinned_to_device_ms"] = timed(lambda h: jax.device_put(h, to_dev), host,
                                       reps=10, rounds=7)
    res["numpy_to_device_ms"] = timed(lambda h: jax.device_put(h, to_dev), region,
                                      reps=10, rounds=7)
    singles = []
    for _ in range(15):                   # one transfer at a time, each waited for
        t0 = time.perf_counter()
        jax.device_put(host, to_dev).block_until_ready()
        singles.append((time.perf_counter() - t0) * 1e3)
    res["pinned_single_ms"] = statistics.median(singles[3:])
    res["pinned_gbs"] = layout.nbytes / res["pinned_to_device_ms"] / 1e6
    res["numpy_gbs"] = layout.nbytes / res["numpy_to_device_ms"] / 1e6
    res["base3_at_measured_pinned_ms"] = SPEC_BASE3_BYTES / res["pinned_gbs"] / 1e6
    res["spec_model_ms"] = SPEC_TRANSFER_MS
    dev_copy = jax.device_put(host, to_dev)
    np.testing.assert_array_equal(np.asarray(dev_copy), region)   # the bytes arrived intact
    print(json.dumps(res), flush=True)
    return res


def _waited_ms(fn, reps: int = 15) -> float:
    """Median ms of fn() run and waited for one at a time (as the engine's loads are)."""
    times = []
    for _ in range(reps + 3):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[3:])


def section_staging(args, rng) -> dict:
    """What one region read from disk costs to reach the device, by route: staged
    through pinned_host (copy into pinned memory, then DMA) or sent straight from the
    (64-byte-aligned) read buffer; for the synthetic-wide region and the config's."""
    from perspective_jax.infer.device_slots import memory_sharding
    from perspective_jax.infer.expert_store import ARRAY_ALIGN, _aligned_empty
    from perspective_jax.modeldir.format import RegionLayout
    dev = jax.devices()[0]
    to_dev, pinned = memory_sharding(dev, "device"), memory_sharding(dev, "pinned_host")
    cfg = _model_cfg(args.config)
    rows = []
    for d, f in ((2048, 5504), (cfg.d_model, cfg.d_ff)):
        nbytes = RegionLayout(d, f).nbytes
        buf = _aligned_empty(nbytes, ARRAY_ALIGN)[:nbytes]
        buf[:] = rng.integers(0, 256, nbytes, dtype=np.uint8)
        host = jax.device_put(buf, pinned).block_until_ready()
        row = {"d_model": d, "d_ff": f, "region_bytes": nbytes,
               "memcpy_ms": _waited_ms(lambda: np.copyto(_aligned_empty(nbytes, 64)[:nbytes],
                                                         buf)),
               "numpy_to_pinned_ms": _waited_ms(lambda: jax.device_put(buf, pinned)),
               "pinned_to_device_ms": _waited_ms(lambda: jax.device_put(host, to_dev)),
               "numpy_to_device_ms": _waited_ms(lambda: jax.device_put(buf, to_dev)),
               "staged_ms": _waited_ms(lambda: jax.device_put(
                   jax.device_put(buf, pinned).block_until_ready(), to_dev))}
        np.testing.assert_array_equal(np.asarray(jax.device_put(buf, to_dev)), buf)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"rows": rows}


def section_ffn(args, rng) -> dict:
    from perspective_jax.infer import layers
    from perspective_jax.modeldir.format import RegionLayout, pack_region
    cfg = _model_cfg(args.config)
    layout = RegionLayout(cfg.d_model, cfg.d_ff)
    d, f = cfg.d_model, cfg.d_ff
    trits = {name: rng.integers(-1, 2, shape).astype(np.int8)
             for name, shape in (("w_gate", (d, f)), ("w_up", (d, f)), ("w_down", (f, d)))}
    region = jnp.asarray(pack_region(trits, layout))
    scales = tuple(jnp.full((1, 1, 1), 0.02, jnp.float32) for _ in range(3))   # [L, E, S]
    res = {"d_model": cfg.d_model, "d_ff": cfg.d_ff, "dtype": cfg.dtype}
    for m in (1, 16):
        hn = jnp.asarray(rng.standard_normal((m, cfg.d_model)), layers.dtype_of(cfg.dtype))
        y = jnp.zeros((m, cfg.d_model), hn.dtype)
        rows = jnp.arange(m)
        fn = lambda y_, hn_: layers.expert_rows(cfg, 0, y_, hn_, rows, region, scales,  # noqa
                                                0, 0)[0]
        # expert_rows donates y: hand it a fresh buffer each call
        res[f"rows{m}_ms"] = timed(lambda hn_: fn(jnp.zeros_like(y), hn_), hn)
        ref = _ffn_reference(trits, np.asarray(hn, np.float64), 0.02)
        res[f"rows{m}_err"] = rel_err(fn(jnp.zeros_like(y), hn), ref)
    res["spec_model_ms"] = SPEC_FFN_MS
    print(json.dumps(res), flush=True)
    return res


def _ffn_reference(trits, x, scale):
    g = x @ (trits["w_gate"] * scale)
    u = x @ (trits["w_up"] * scale)
    h = g / (1 + np.exp(-g)) * u
    return h @ (trits["w_down"] * scale)


SECTIONS = {"ternary": section_ternary, "shared": section_shared, "pdr": section_pdr,
            "transfer": section_transfer, "staging": section_staging, "ffn": section_ffn}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(REPO, "curricula", "perspective-1t.yaml"))
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(
        REPO, "docs", "device_runs", f"{time.strftime('%Y-%m-%d')}-{jax.default_backend()}"))
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    dev = jax.devices()[0]
    report = {"jax": jax.__version__, "backend": jax.default_backend(),
              "device": getattr(dev, "device_kind", str(dev))}
    print(json.dumps(report), flush=True)
    for name in [s for s in args.sections.split(",") if s]:
        t0 = time.perf_counter()
        try:
            report[name] = SECTIONS[name](args, rng)
        except Exception as e:  # noqa: BLE001 - one broken section must not hide the rest
            traceback.print_exc()
            report[name] = {"error": f"{type(e).__name__}: {str(e)[:600]}"}
        report[name + "_s"] = time.perf_counter() - t0
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_checks.json"), "w") as fh:
            json.dump(report, fh, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k.endswith("_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
