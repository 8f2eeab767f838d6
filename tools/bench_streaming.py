"""Streaming inference engine on this machine (issue 6 measurement).

(A) synthetic wide models (18 expert layers × 64 experts, ≈ 9.7 GB of packed
    experts, built once under --work-dir): decode tok/s, bytes moved and read
    per token, host-cache hit rate, prefetch accuracy and stalls for io="mmap"
    (page cache, files pre-read) and io="direct" (O_DIRECT, disk), the
    bandwidth bound (read bandwidth measured here with the same io path ÷ bytes
    read per token), and the compute-only rate (every expert device-resident);
    coherent routers (router prediction works) vs incoherent ones.
(B) bytes moved per token with and without delta streaming on the exported
    trained tiny model (runs/quickstart) and on a small synthetic model whose
    lattice neighbours differ in 2 % of their bytes.
(C) decode memory and tok/s after prefilling 512 / 4096 / 16384 tokens on the
    exported tiny model (context flatness).

Every measurement runs in a fresh subprocess (so RSS and caches of one do not
leak into the next); compilation is excluded (warm-up steps before the timed
window, statistics diffed over the window).

    .venv/bin/python tools/bench_streaming.py [--work-dir /tmp/perspective-bench]
        [--tokens 32] [--variants wide,narrow] [--parts A,B,C] [--skip-build]
        [--experts 64] [--host-mb 1024] [--routers coherent,incoherent]

Model building and the read-bandwidth probe live in `streaming_models.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MB = 1 << 20
TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
        "First Citizen: You are all resolved rather to die than to famish? All: Resolved. "
        "resolved. First Citizen: First, you know Caius Marcius is chief enemy to the "
        "people. All: We know't, we know't. First Citizen: Let us kill him, and we'll have "
        "corn at our own price. Is't a verdict? All: No more talking on't; let it be done: "
        "away, away! Second Citizen: One word, good citizens.")
# d_model, d_ff: both 3·d·f = 33.8M trits per expert-layer (8.45 MB packed)
VARIANTS = {"wide": (2048, 5504), "narrow": (1024, 11008)}
PROMPT_LEN = 16
WARMUP_STEPS = 4

from streaming_models import (LATTICES, build_synthetic, derive_incoherent,  # noqa: E402
                              derive_quantized, export_quickstart, preread, read_bandwidth,
                              synthetic_cfg, synthetic_path)


# ---------------------------------------------------------------- one measurement (child)
# part A --compare: engine variants decoded beside the default one
# (every variant but "transfer" without the transfer thread, the GPU default since 12-04)
VARIANT_KWARGS = {"": {"transfer_thread": False},
                  "pin_first": {"pin_before_transfer": True, "transfer_thread": False},
                  "cancel": {"cancel_wrong_reads": True, "transfer_thread": False},
                  "transfer": {"transfer_thread": True}}
VARIANT_LABELS = {"pin_first": "pinned before transfer",
                  "cancel": "wrong prefetches cancelled",
                  "transfer": "transfer thread"}
COMPARE = {"staging": "pin_first", "cancel": "cancel", "transfer": "transfer"}


def alternating(variants: tuple, repeats: int) -> list[tuple[str, int]]:
    """(variant, repeat) in the order to run them: forward, then backward, … (A B B A
    A B …), so no variant always runs first."""
    order = []
    for r in range(repeats):
        order += [(v, r) for v in (variants if r % 2 == 0 else variants[::-1])]
    return order


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _snapshot(engine) -> dict:
    s = engine.stats
    snap = {"tokens": s.decode_tokens, "seconds": s.decode_s,
            "predictions": s.predictions, "right": s.predicted_right,
            "stalls": s.stalls, "stall_s": s.stall_s, "cancelled": s.cancelled}
    if engine.routed:
        from perspective_jax.infer.stats import KINDS
        snap.update({f"n_{k}": s.transfers[k] for k in KINDS})
        snap.update({f"b_{k}": s.bytes_moved[k] for k in (*KINDS, "wasted")})
        snap.update({"disk": engine.store.bytes_read, "hits": engine.host.hits,
                     "misses": engine.host.misses})
    return snap


def _diff(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in a}


def decode_window(engine, tokens, n_decode: int, warmup: int = WARMUP_STEPS,
                  state=None) -> tuple[dict, dict]:
    """Prefill `tokens[:PROMPT_LEN]` (unless `state` is given), `warmup` decode steps
    (compiles), then `n_decode` timed steps; returns (window diff, state)."""
    import numpy as np
    if state is None:
        state = engine.new_state()
        _, state = engine.forward(np.asarray(tokens[:PROMPT_LEN]), state)
        at = PROMPT_LEN
    else:
        at = 0
    for t in tokens[at: at + warmup]:
        _, state = engine.forward(np.asarray([t]), state)
    at += warmup
    before = _snapshot(engine)
    t0 = time.perf_counter()
    for t in tokens[at: at + n_decode]:
        logits, state = engine.forward(np.asarray([t]), state)
    np.asarray(logits)
    wall = time.perf_counter() - t0
    out = _diff(before, _snapshot(engine))
    out["wall_s"] = wall
    return out, state


def job(spec: dict) -> dict:
    """Run one measurement described by `spec`; returns a JSON-able dict."""
    import numpy as np
    from perspective_jax.infer.engine import StreamingEngine
    from perspective_jax.infer.options import EngineOptions
    kind = spec["kind"]
    if kind == "bandwidth":
        return {"bytes_per_s": read_bandwidth(spec["dir"], spec["io"], spec["nbytes"])}
    t0 = time.perf_counter()
    eng = StreamingEngine(spec["dir"], EngineOptions(host_budget_mb=spec.get("host_mb", 1024),
                                                     device_slots=spec.get("slots", 2),
                                                     prefetch=spec.get("prefetch", True),
                                                     use_deltas=spec.get("deltas", True),
                                                     io=spec.get("io", "mmap"),
                                                     **VARIANT_KWARGS[spec.get("variant", "")]))
    init_s = time.perf_counter() - t0
    vocab = eng.model.vocab_size
    n = spec["tokens"]
    if spec.get("random_tokens"):
        toks = np.random.default_rng(0).integers(0, vocab, PROMPT_LEN + WARMUP_STEPS + n)
    else:
        toks = np.frombuffer((TEXT * 8).encode(), np.uint8).astype(np.int32) % vocab
    out = {"init_s": init_s, "region_bytes": eng.region_bytes,
           "expert_layers": len(eng.expert_layers)}
    try:
        if kind == "decode":
            w, _ = decode_window(eng, toks, n)
            out["window"] = w
        elif kind == "compute_only":
            # pass 1 brings every expert the window needs into its own device slot;
            # pass 2 decodes the same tokens again: every transfer is "same"
            decode_window(eng, toks, n)
            w, _ = decode_window(eng, toks, n)
            out["window"] = w
        elif kind == "context":
            ctx = np.random.default_rng(1).integers(0, vocab, spec["context"] + 64)
            state = eng.new_state()
            t1 = time.perf_counter()
            _, state = eng.forward(ctx[: spec["context"]], state)
            out["prefill_s"] = time.perf_counter() - t1
            w, state = decode_window(eng, ctx[spec["context"]:], n, state=state)
            out["window"] = w
            out["rss_mb"] = rss_mb()
            out["device_bytes_needed"] = eng.device_bytes_needed
            out["state_bytes"] = eng.state_bytes
            out["next_pos"] = state.next_pos
        out["deltas_in_manifest"] = sum(len(layer["deltas"])
                                        for layer in eng.manifest["experts"]["layers"])
    finally:
        eng.close()
    return out


def run_job(spec: dict, log) -> dict:
    log(f"  job {json.dumps({k: v for k, v in spec.items() if k != 'dir'})} "
        f"on {os.path.basename(spec.get('dir', ''))}")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--job", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"job failed: {spec}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    log(f"    {time.perf_counter() - t0:.1f} s")
    return out


# ---------------------------------------------------------------- tables
def tok_s(w: dict) -> float:
    return w["tokens"] / w["seconds"] if w["seconds"] else float("nan")


def kinds(w: dict) -> str:
    """Brings per kind: same/delta/host delta/full."""
    return f"{w['n_same']}/{w['n_delta']}/{w['n_host_delta']}/{w['n_full']}"


def per_tok(w: dict, key: str) -> float:
    return w[key] / w["tokens"] / 1e6


def hit_rate(w: dict) -> float:
    n = w["hits"] + w["misses"]
    return w["hits"] / n if n else float("nan")


def accuracy(w: dict) -> float:
    return w["right"] / w["predictions"] if w["predictions"] else float("nan")


def fmt_rate(x: float) -> str:
    return f"{100 * x:.0f} %" if x == x else "–"


def shared_bit_copies(args, path: str) -> tuple[str, str]:
    """Derive (or reuse) the --shared-bits copies of `path` and, when the incoherent
    routers are asked for, of its incoherent twin; returns (coherent, incoherent) paths."""
    suffix = f"-shared{args.shared_bits}"
    inco = path + "-incoherent"
    derive_quantized(path, path + suffix, args.shared_bits)
    if "incoherent" in args.routers:
        derive_quantized(inco, inco + suffix, args.shared_bits)
    return path + suffix, inco + suffix


def part_a(args, log) -> list[str]:
    shared = (f"{args.shared_bits}-bit packed shared weights" if args.shared_bits
              else "float32 shared weights")
    lines = [f"### (A) Synthetic 18 × {args.experts}-expert models, {shared}, "
             f"{args.host_mb} MB host budget, 2 device slots, prefetch on, "
             f"{args.tokens} decode tokens", ""]
    rows, summary = [], []
    for name in args.variants:
        d, f = VARIANTS[name]
        path = synthetic_path(args, name)
        inco = path + "-incoherent"
        if not args.skip_build:
            log(f"[A] building {path} (d_model {d}, d_ff {f}) unless present")
            s = build_synthetic(path, synthetic_cfg(d, f, experts=args.experts), log)
            log(f"    build {s:.0f} s" if s else "    reused")
            if "incoherent" in args.routers:
                derive_incoherent(path, inco)
        if args.shared_bits:                  # same expert files, packed shared weights
            log(f"[A] deriving {args.shared_bits}-bit shared-weight copies unless present")
            path, inco = shared_bit_copies(args, path)
        gb, s = preread(path)
        log(f"[A] pre-read {gb:.2f} GB of expert files in {s:.1f} s "
            f"({gb / s:.2f} GB/s); the store now sits in the page cache")
        bw = {}
        for io in ("mmap", "direct"):
            try:
                bw[io] = run_job({"kind": "bandwidth", "dir": path, "io": io,
                                  "nbytes": args.bw_mb * MB}, log)["bytes_per_s"]
            except RuntimeError as e:      # e.g. a filesystem without O_DIRECT
                log(f"    {io} reads unavailable here ({e}); skipping io={io}")
        preread(path)
        compute = run_job({"kind": "compute_only", "dir": path, "tokens": args.tokens,
                           "slots": 18 * (PROMPT_LEN + WARMUP_STEPS + args.tokens) + 2,
                           "host_mb": args.host_mb}, log)["window"]
        runs = []
        for coherent in [r == "coherent" for r in args.routers]:
            for io in bw:
                variants = ("",) + tuple(COMPARE[c] for c in args.compare)
                for variant, rep in alternating(variants, args.repeats):
                    preread(path) if io == "mmap" else None
                    w = run_job({"kind": "decode", "dir": path if coherent else inco,
                                 "io": io, "tokens": args.tokens, "slots": 2,
                                 "host_mb": args.host_mb, "variant": variant},
                                log)["window"]
                    runs.append((coherent, io, variant, rep, w))
        c_rate = tok_s(compute)
        groups = list(dict.fromkeys(r[:2] for r in runs))     # (routers, io) as run
        for coherent, io, variant, rep, w in sorted(
                runs, key=lambda r: (groups.index(r[:2]), variants.index(r[2]), r[3])):
            read_mb = per_tok(w, "disk")
            moved_mb = (w["b_full"] + w["b_host_delta"] + w["b_delta"]) / w["tokens"] / 1e6
            bound = bw[io] / (read_mb * 1e6) if read_mb else float("inf")
            # the same bound counting only the bytes of experts actually used (no wasted
            # prefetches): the stricter reading of "bytes that had to move"
            bound_used = bw[io] / (moved_mb * 1e6) if moved_mb else float("inf")
            t_io = read_mb * 1e6 / bw[io]
            serial = 1 / (t_io + 1 / c_rate)
            rows.append(
                f"| {name} ({d}/{f}) | {'yes' if coherent else 'no'} | "
                f"{'page cache (mmap)' if io == 'mmap' else 'disk (O_DIRECT)'}"
                f"{', ' + VARIANT_LABELS[variant] if variant else ''}"
                f"{f' #{rep + 1}' if args.repeats > 1 else ''} | "
                f"{tok_s(w):.2f} | {moved_mb:.1f} | {read_mb:.1f} | {per_tok(w, 'b_wasted'):.1f} | "
                f"{kinds(w)} | {fmt_rate(hit_rate(w))} | "
                f"{fmt_rate(accuracy(w))} | {w.get('cancelled', 0) / w['tokens']:.1f} | "
                f"{w['stalls'] / w['tokens']:.1f} "
                f"({1e3 * w['stall_s'] / w['tokens']:.0f} ms) | {bw[io] / 1e9:.2f} | "
                f"{bound:.1f} | {100 * tok_s(w) / bound:.0f} % | "
                f"{100 * tok_s(w) / bound_used:.0f} % | {c_rate:.2f} | "
                f"{100 * tok_s(w) / min(bound, c_rate):.0f} % | "
                f"{100 * tok_s(w) / serial:.0f} % |")
        summary.append(f"| {name} ({d}/{f}) | {c_rate:.2f} | {1e3 / c_rate:.0f} | "
                       f"{kinds(compute)} | "
                       f"{compute['stalls']} | {bw.get('mmap', 0) / 1e9:.2f} | "
                       f"{bw.get('direct', 0) / 1e9:.2f} |")
    lines += ["Compute-only rate (same tokens decoded a second time with one device slot per "
              "needed expert: every transfer is \"same\", nothing is read or moved) and read "
              f"bandwidth measured with the engine's io paths ({args.bw_mb} MB of region-sized "
              "reads):", "",
              "| model (d_model/d_ff) | compute-only tok/s | ms/token | same/delta/host delta/full | "
              "stalls | page-cache GB/s | disk O_DIRECT GB/s |",
              "|---|---:|---:|---|---:|---:|---:|", *summary, "",
              "Streaming runs (per token: MB moved host→device for the experts used, MB read from the store, MB "
              "of wasted (mispredicted) prefetches; stalls per token and their time; bound = "
              "read bandwidth ÷ MB read per token (\"used experts' bytes\": ÷ MB moved "
              "host→device for the experts used — host-cache hits included, wasted "
              "prefetches not); \"of min\" = tok/s ÷ min(I/O bound, "
              "compute-only rate); \"of serial\" = tok/s ÷ 1/(I/O time + compute time)):", "",
              "| model | coherent routers | io | tok/s | MB moved/tok (used) | MB read/tok | MB wasted/tok "
              "| same/delta/host delta/full | host hit | prefetch acc. | cancelled/tok | stalls/tok "
              "| read GB/s | "
              "I/O bound tok/s | % of I/O bound | % of bound, used experts' bytes | "
              "compute-only tok/s | % of min | % of serial |",
              "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
              "---:|---:|",
              *rows, ""]
    return lines


def part_b(args, log) -> list[str]:
    tiny = os.path.join(args.work_dir, "quickstart-model")
    small = os.path.join(args.work_dir, "synthetic-small-flip2")
    log(f"[B] exporting {args.run_dir} → {tiny} unless present")
    export_quickstart(args.run_dir, tiny, log)
    small_cfg = synthetic_cfg(256, 1024, n_layers=8, experts=8, lattice=(2, 2, 2))
    log(f"[B] building {small} unless present")
    build_synthetic(small, small_cfg, log, neighbour_flip_share=0.02)
    rows = []
    for label, path in (("trained tiny (runs/quickstart)", tiny),
                        ("synthetic small, 2 % neighbour flips", small)):
        with open(os.path.join(path, "manifest.json")) as fh:
            m = json.load(fh)
        n_layers = len(m["experts"]["layers"])
        kept = sum(len(layer["deltas"]) for layer in m["experts"]["layers"])
        counts = [d.get("bytes", 5 * d["count"])                 # record bytes on disk
                  for layer in m["experts"]["layers"] for d in layer["deltas"]]
        region = m["experts"]["region_bytes"]
        possible = n_layers * 2 * len(__import__("perspective_jax.moe.torus", fromlist=["x"])
                                      .neighbour_pairs(tuple(m["config"]["moe"]["lattice"])))
        mean_delta = (sum(counts) / len(counts) / region) if counts else float("nan")
        for slots in (n_layers + 1, 2):
            base = None
            for deltas in (False, True):
                w = run_job({"kind": "decode", "dir": path, "tokens": args.tokens,
                             "slots": slots, "deltas": deltas, "random_tokens": True,
                             "host_mb": 1024}, log)["window"]
                moved = (w["b_full"] + w["b_host_delta"] + w["b_delta"]
                         + w["b_wasted"]) / w["tokens"]
                base = moved if base is None else base
                rows.append(
                    f"| {label} | {n_layers} | {region / 1e3:.1f} | {kept}/{possible} | "
                    f"{fmt_rate(mean_delta) if counts else '–'} | {slots} | "
                    f"{'on' if deltas else 'off'} | {kinds(w)} | "
                    f"{moved / 1e3:.1f} | {100 * moved / base:.0f} % | {tok_s(w):.1f} |")
    return ["### (B) Delta streaming: bytes moved per decode token", "",
            f"{args.tokens} decode tokens (random ids) after a {PROMPT_LEN}-token prompt; "
            "\"deltas kept\" counts the neighbour deltas the exporter wrote (of all directed "
            "neighbour pairs; one is kept only when its record — 5 bytes per changed byte, or a "
            "byte-change bitmap plus the changed bytes, whichever is smaller — is ≤ 50 % of a "
            "region); "
            "\"delta size\" is the mean kept delta as a share of a region.", "",
            "| model | expert layers | region KB | deltas kept | delta size | device slots | "
            "deltas | same/delta/host delta/full | KB moved/token (incl. wasted) | vs deltas off | tok/s |",
            "|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|", *rows, ""]


def part_c(args, log) -> list[str]:
    tiny = os.path.join(args.work_dir, "quickstart-model")
    export_quickstart(args.run_dir, tiny, log)
    rows = []
    for ctx in args.contexts:
        r = run_job({"kind": "context", "dir": tiny, "tokens": args.tokens, "context": ctx,
                     "slots": 2}, log)
        w = r["window"]
        rows.append(f"| {ctx} | {r['prefill_s']:.1f} | {ctx / r['prefill_s']:.0f} | "
                    f"{r['device_bytes_needed'] / MB:.2f} | {r['state_bytes'] / 1e3:.1f} | "
                    f"{r['rss_mb']:.0f} | {tok_s(w):.1f} | {1e3 * w['seconds'] / w['tokens']:.1f} |")
    return ["### (C) Context flatness (exported tiny model, 2 device slots)", "",
            f"Prefill in chunks of 256 tokens (random ids), {WARMUP_STEPS} untimed decode "
            f"steps, then {args.tokens} timed decode steps; RSS = VmRSS of the measuring "
            "process after decoding (each context in a fresh process).", "",
            "| context tokens | prefill s | prefill tok/s | device bytes needed (MB) | "
            "decode state KB | process RSS MB | decode tok/s | ms/token |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|", *rows, ""]


def machine() -> str:
    import jax
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    with open("/proc/meminfo") as fh:
        mem = int(fh.readline().split()[1]) / 1024 / 1024
    dev = jax.devices()[0]
    accel = "no accelerator" if dev.platform == "cpu" else f"accelerator {dev.device_kind}"
    return (f"{os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GB RAM, {accel}; "
            f"jax {jax.__version__} ({jax.default_backend()}), Python {platform.python_version()}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", default="/tmp/perspective-bench")
    p.add_argument("--run-dir", default=os.path.join(REPO, "runs", "quickstart"))
    p.add_argument("--tokens", type=int, default=32, help="timed decode tokens per run")
    p.add_argument("--variants", default="wide,narrow",
                   help=f"synthetic models of part A, of {','.join(VARIANTS)}")
    p.add_argument("--parts", default="A,B,C")
    p.add_argument("--experts", type=int, default=64,
                   help="experts per layer of the part-A models (64 → 4×4×4 lattice)")
    p.add_argument("--host-mb", type=int, default=1024, help="part A host-cache budget")
    p.add_argument("--routers", default="coherent,incoherent",
                   help="part A router kinds to run: coherent, incoherent or both")
    p.add_argument("--shared-bits", type=int, default=0, choices=(0, 2, 3, 4, 8),
                   help="part A: run on copies of the stores whose shared kernels are "
                        "round-to-nearest group codes of this many bits (0: float32)")
    p.add_argument("--compare", default="",
                   help="part A: also decode with these engine variants (comma-separated): "
                        "staging = each disk read pinned in the host tier before its "
                        "device transfer (the old order); cancel = wrong prefetches still "
                        "reading are cancelled; transfer = regions copied to the device "
                        "on a thread of their own while the disk reads on")
    p.add_argument("--repeats", type=int, default=1,
                   help="part A: decode each variant this many times, the order of "
                        "variants alternating (A B B A …); one row per run")
    p.add_argument("--contexts", default="512,4096,16384")
    p.add_argument("--bw-mb", type=int, default=1536, help="MB read to measure bandwidth")
    p.add_argument("--skip-build", action="store_true",
                   help="use the model directories already in --work-dir")
    p.add_argument("--build-only", action="store_true")
    p.add_argument("--job", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.job:
        print(json.dumps(job(json.loads(a.job))))
        return 0
    a.variants = [v for v in a.variants.split(",") if v]
    a.compare = [c for c in a.compare.split(",") if c]
    if a.repeats < 1:
        p.error(f"--repeats must be ≥ 1, got {a.repeats}")
    if set(a.compare) - set(COMPARE):
        p.error(f"--compare takes a comma-separated list of {', '.join(sorted(COMPARE))}; "
                f"got {','.join(a.compare)}")
    a.routers = [r for r in a.routers.split(",") if r]
    if set(a.routers) - {"coherent", "incoherent"} or a.experts not in LATTICES:
        p.error(f"--routers takes coherent,incoherent; --experts one of {sorted(LATTICES)}")
    a.contexts = [int(c) for c in a.contexts.split(",") if c]
    parts = {s.strip().upper() for s in a.parts.split(",")}
    os.makedirs(a.work_dir, exist_ok=True)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if a.build_only:
        for name in a.variants:
            path = synthetic_path(a, name)
            s = build_synthetic(path, synthetic_cfg(*VARIANTS[name], experts=a.experts), log)
            if "incoherent" in a.routers:
                derive_incoherent(path, path + "-incoherent")
            log(f"{path}: {'built in %.0f s' % s if s else 'reused'}")
            if a.shared_bits:
                log(f"{shared_bit_copies(a, path)[0]}: derived or current")
        return 0
    t0 = time.perf_counter()
    out = [f"Machine: {machine()}", ""]
    for part, fn in (("A", part_a), ("B", part_b), ("C", part_c)):
        if part in parts:
            out += fn(a, log)
    out.append(f"Total runtime: {time.perf_counter() - t0:.0f} s")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
