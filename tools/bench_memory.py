"""Hypervector memory (issue 25): retrieval accuracy against load, and speed and
bytes against a bool-per-element store of the same operations.

    python tools/bench_memory.py                          # every table, ~6 min on 2 cores
    python tools/bench_memory.py --loads 100,1000 --queries 200 --json /tmp/hdm.json
    /path/to/torch-venv/bin/python tools/bench_memory.py --only torchhd

(a) Accuracy: `--loads` random key/value pairs (D = 10,000 bits, 2,000 banks) stored
with `add_many`; `--queries` stored keys sampled per cell, exact and with 10/20/30 %
of their bits flipped (`hypervector.flip`), queried with `query_many` at each of
`--probes`. "right" = the hit is the key's own row; "found" = right and similarity
≥ 0.53 (what recall injects); "false" = unrelated random queries scoring ≥ 0.53.
Then one bundle (n_banks = 1) at `--bundle-loads`, exact keys.
(b) Speed: µs per insert (`add`, one at a time, and `add_many` per pair), per
removal, per query (`query` one at a time and `query_many` over 1,024 queries), for
exact, 30 %-flipped and unrelated queries; `hamming_table` on its NumPy and JAX
paths. Bytes per entry: the memory file and the arrays in memory, against a
bool-per-element store (1 byte a bit, what torchhd's BSC tensors hold), whose
bundle / unbind / Hamming operations are timed side by side (`BoolMemory` below;
`--only torchhd` times torchhd's own where torch is installed).
Prints Markdown tables; `--json FILE` writes every number.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import numpy as np

THRESHOLD = 0.53                 # a threshold for random hypervectors (best unrelated ≈ 0.515); text
                                 # queries from a model use RecallConfig.min_similarity (0.65)
NOISES = (0.0, 0.1, 0.2, 0.3)


def table(title: str, head: list, rows: list) -> None:
    print(f"\n{title}\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    sys.stdout.flush()


def us(seconds: float, n: int) -> float:
    return round(seconds / max(n, 1) * 1e6, 1)


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


# ------------------------------------------------------------------ accuracy
def build(hv, HDMemory, MemoryParams, n: int, rng, n_banks: int = 2000):
    keys, vals = hv.random(rng, n), hv.random(rng, n)
    mem = HDMemory.new(MemoryParams(n_banks=n_banks))
    t0 = time.perf_counter()
    mem.add_many(keys, vals)
    return mem, keys, time.perf_counter() - t0


def score(hits, rows) -> dict:
    right = np.array([h is not None and h.row == r for h, r in zip(hits, rows)])
    sim = np.array([h.similarity if h is not None else 0.0 for h in hits])
    return {"right": float(right.mean()), "found": float((right & (sim >= THRESHOLD)).mean()),
            "mean_similarity_right": float(sim[right].mean()) if right.any() else None}


def accuracy_cells(hv, mem, keys, rng, n_queries: int, probes_list, noises=NOISES,
                   store=None):
    """Per noise and probes: right / found shares; with `store`, also with the first
    passes off (everything compared in full) at the largest probes."""
    rows = rng.choice(len(keys), min(n_queries, len(keys)), replace=False)
    out = []
    for noise in noises:
        q = keys[rows] if noise == 0 else hv.flip(keys[rows], noise, rng)
        for probes in probes_list:
            cell = {"noise": noise, "probes": probes, "queries": len(rows),
                    **score(mem.query_many(q, probes), rows)}
            if store is not None and probes == max(probes_list):
                with first_passes(store, False):
                    full = score(mem.query_many(q, probes), rows)
                cell |= {"right_full": full["right"], "found_full": full["found"]}
            out.append(cell)
    unrelated = mem.query_many(hv.random(rng, len(rows)), max(probes_list))
    false = float(np.mean([h is not None and h.similarity >= THRESHOLD for h in unrelated]))
    return out, false


# ------------------------------------------------------------------ speed
def time_inserts(hv, mem, rng, n: int):
    """µs per add (one at a time), then per removal of the same rows (back to before)."""
    keys, vals = hv.random(rng, n), hv.random(rng, n)
    base = len(mem)
    t0 = time.perf_counter()
    for k, v in zip(keys, vals):
        mem.add(k, v)
    t_add = time.perf_counter() - t0
    t0 = time.perf_counter()
    for r in range(base + n - 1, base - 1, -1):
        mem.remove_rows([r])
    t_remove = time.perf_counter() - t0
    return us(t_add, n), us(t_remove, n)


@contextlib.contextmanager
def first_passes(store, on: bool):
    """The store's first passes (probe, decode) on, or off: everything in full, as
    the store compared before them."""
    saved = store.PREFILTER_KEEP, store.DECODE_KEEP
    if not on:
        store.PREFILTER_KEEP = store.DECODE_KEEP = 10**9
    try:
        yield
    finally:
        store.PREFILTER_KEEP, store.DECODE_KEEP = saved


def time_queries(hv, store, mem, keys, rng, n_single: int, n_batch: int, probes: int,
                 rounds: int = 5):
    """µs per query, one at a time and batched, for exact, 30 % flipped and unrelated
    keys, with the first passes on and off, interleaved (median of `rounds`: the
    machine is shared)."""
    out = {}
    for kind in ("exact", "30% flipped", "unrelated"):
        rows = rng.choice(len(keys), n_batch)
        q = {"exact": lambda: keys[rows], "30% flipped": lambda: hv.flip(keys[rows], 0.3, rng),
             "unrelated": lambda: hv.random(rng, n_batch)}[kind]()
        times = {(on, how): [] for on in (True, False) for how in ("single", "batched")}
        for on in (True, False):
            with first_passes(store, on):
                mem.query_many(q, probes)                           # warm (JAX blocks)
        per = max(1, n_single // rounds)
        for r in range(rounds):
            for on in (True, False):
                with first_passes(store, on):
                    t0 = time.perf_counter()
                    for x in q[r * per:(r + 1) * per]:
                        mem.query(x, probes)
                    times[(on, "single")].append(us(time.perf_counter() - t0, per))
                    if r < 3:
                        t0 = time.perf_counter()
                        mem.query_many(q, probes)
                        times[(on, "batched")].append(us(time.perf_counter() - t0, len(q)))
        out[kind] = {f"{how}_us{'' if on else '_full'}": float(np.median(v))
                     for (on, how), v in times.items()}
    return out


def time_tables(hv, rng, n_banks: int = 2000):
    """hamming_table µs per query against n_banks vectors, NumPy vs JAX path."""
    x = hv.random(rng, n_banks)
    out = {}
    for q_n in (1, 64, 1024):
        q = hv.random(rng, q_n)
        for use_jax in (False, True):
            hv.hamming_table(q[:1] if q_n == 1 else q, x, use_jax=use_jax)   # warm
            reps = max(1, 200 // q_n)
            t0 = time.perf_counter()
            for _ in range(reps):
                hv.hamming_table(q, x, use_jax=use_jax)
            out[(q_n, "jax" if use_jax else "numpy")] = us(time.perf_counter() - t0, reps * q_n)
        out[(q_n, "default")] = ("jax" if q_n * n_banks * x.shape[1] >= hv.JAX_MIN_CELLS
                                 else "numpy")
    return out


def memory_bytes(mem, mfile, tmp: str) -> dict:
    path = os.path.join(tmp, "bench.hdm")
    mfile.save(path, mfile.MemoryFile(mem, np.zeros(256, np.float32), None))
    n = len(mem)
    arrays = (mem.key_hv, mem.value_hv, mem.bank, mem.time, mem.confidence, mem.ids,
              mem.banks.packed, mem.key_banks.packed, mem.banks.sizes)
    dim, banks = mem.params.dim, mem.params.n_banks
    as_bool = 2 * n * dim + 2 * banks * dim + 4 * n + 8 * n + 4 * n + 8 * n
    size = os.path.getsize(path)
    os.remove(path)
    return {"entries": n, "file_bytes_per_entry": size / n,
            "memory_bytes_per_entry": sum(a.nbytes for a in arrays) / n,
            "bool_bytes_per_entry": as_bool / n}


class BoolMemory:
    """The same store with a bool per element (what a BSC tensor of torchhd holds):
    keys/values [N, D] bool, banks by majority [B, D] bool, the same bank of each
    pair, the same probing by key bundles, unbind and nearest value."""

    def __init__(self, keys, vals, bank, n_banks, tie):
        self.keys, self.vals, self.bank = keys, vals, bank
        self.banks = self._bundle(keys ^ vals, bank, n_banks, tie)
        self.key_banks = self._bundle(keys, bank, n_banks, tie)
        order = np.argsort(bank, kind="stable")
        size = np.bincount(bank, minlength=n_banks)
        self.members = np.full((n_banks, max(1, size.max())), -1, np.int64)
        start = np.concatenate([[0], np.cumsum(size)[:-1]])
        self.members[bank[order], np.arange(len(order)) - np.repeat(start, size)] = order

    @staticmethod
    def _bundle(bits, bank, n_banks, tie):
        counts = np.zeros((n_banks, bits.shape[1]), np.int32)
        np.add.at(counts, bank, bits)
        n = np.bincount(bank, minlength=n_banks)[:, None]
        return np.where(2 * counts == n, tie, 2 * counts > n)

    def query(self, q, probes=8):
        dist = (q[None, :] != self.key_banks).sum(1)                        # Hamming
        banks = np.argpartition(dist, probes - 1)[:probes]
        unbound = self.banks[banks] ^ q[None, :]                            # unbind
        rows = self.members[banks]                                          # [P, S]
        d = (unbound[:, None, :] != self.vals[np.maximum(rows, 0)]).sum(-1)
        d = np.where(rows >= 0, d, q.size + 1)
        return int(rows.reshape(-1)[np.argmin(d)])


def bool_comparison(hv, mem, keys, rng, n_queries: int, probes: int) -> dict:
    dim = mem.params.dim
    kb, vb = hv.unpack(keys, dim), hv.unpack(mem.value_hv, dim)
    tie = hv.unpack(mem.banks.tie, dim)
    t0 = time.perf_counter()
    ref = BoolMemory(kb, vb, mem.bank.astype(np.int64), mem.params.n_banks, tie)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    mem.rebuild_banks()
    t_build_packed = time.perf_counter() - t0
    same = bool(np.array_equal(hv.pack(ref.banks), mem.banks.packed)
                and np.array_equal(hv.pack(ref.key_banks), mem.key_banks.packed))
    rows = rng.choice(len(keys), n_queries, replace=False)
    t0 = time.perf_counter()
    got = [ref.query(kb[r], probes) for r in rows]
    t_query = time.perf_counter() - t0
    t0 = time.perf_counter()
    packed = [mem.query(keys[r], probes).row for r in rows]
    t_query_packed = time.perf_counter() - t0
    a, b = kb[:1000], vb[:1000]
    pa, pb = keys[:1000], mem.value_hv[:1000]
    ops = {}
    for name, f_bool, f_packed in (
            ("bind 1,000 pairs", lambda: a ^ b, lambda: hv.bind(pa, pb)),
            ("Hamming 1 × 2,000 banks", lambda: (kb[0][None] != ref.key_banks).sum(1),
             lambda: hv.hamming_table(keys[:1], mem.key_banks.packed)),
            ("bundle 50 vectors", lambda: a[:50].sum(0) * 2 > 50,
             lambda: hv.pack(hv.unpack(pa[:50], dim).sum(0) * 2 > 50))):
        ops[name] = [_time(f_bool), _time(f_packed)]
    return {"entries": len(keys), "same_banks": same,
            "same_answers": got == packed, "right": float(np.mean(np.array(got) == rows)),
            "build_s": [round(t_build, 2), round(t_build_packed, 2)],
            "query_us": [us(t_query, n_queries), us(t_query_packed, n_queries)],
            "ops_us": ops,
            "bytes_per_vector": [dim, hv.words(dim) * 8]}


def _time(f, reps: int = 20) -> float:
    f()
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    return us(time.perf_counter() - t0, reps)


# ------------------------------------------------------------------ torchhd
def torchhd_ops(dim: int = 10_000, n_banks: int = 2000) -> dict:
    """torchhd's BSC model (torch bool tensors): bind, Hamming against 2,000
    bundles, bundle 50 vectors; bytes per vector. Needs torch and torch-hd."""
    import torch
    import torchhd
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    a = torchhd.random(1000, dim, vsa="BSC")
    b = torchhd.random(1000, dim, vsa="BSC")
    banks = torchhd.random(n_banks, dim, vsa="BSC")
    q = a[:1]
    ops = {"bind 1,000 pairs": _time(lambda: torchhd.bind(a, b)),
           "Hamming 1 × 2,000 banks": _time(lambda: torchhd.hamming_similarity(q, banks)),
           # all pairs: it builds [Q, N, D] bools, so 16 queries at a time
           "Hamming 16 × 2,000 banks, per query": _time(
               lambda: torchhd.hamming_similarity(a[:16], banks), reps=5) / 16,
           "bundle 50 vectors": _time(lambda: torchhd.multibundle(a[:50]))}
    return {"torch": torch.__version__, "torchhd": getattr(torchhd, "__version__", "?"),
            "dtype": str(a.dtype), "bytes_per_vector": a[0].element_size() * a[0].numel(),
            "ops_us": ops}


def torchhd_results(python):
    """torchhd_ops here, or in `python` (a venv with torch-hd), or why not."""
    if python is None:
        try:
            return torchhd_ops()
        except ImportError as exc:
            return (f"not importable here ({exc}); pass --torchhd-python with a venv "
                    "that has torch-hd")
    import subprocess
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "torchhd.json")
        run = subprocess.run([python, os.path.abspath(__file__), "--only", "torchhd",
                              "--json", out], capture_output=True, text=True)
        if run.returncode:
            return f"{python} failed: {run.stderr.strip().splitlines()[-1:]}"
        with open(out) as fh:
            return json.load(fh)["torchhd"]


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loads", default="100,1000,10000,100000")
    p.add_argument("--queries", type=int, default=1000, help="sampled keys per cell")
    p.add_argument("--probes", default="1,8")
    p.add_argument("--bundle-loads", default="100,500,1000")
    p.add_argument("--speed-loads", default="1000,10000,100000")
    p.add_argument("--inserts", type=int, default=100)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["torchhd"], default=None)
    p.add_argument("--torchhd-python", default=None,
                   help="a Python with torch and torch-hd: its --only torchhd run joins the "
                        "bool-per-element table")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    results: dict = {}
    if args.only == "torchhd":
        r = torchhd_ops()
        table(f"torchhd {r['torchhd']} (torch {r['torch']}, {r['dtype']}), "
              f"{r['bytes_per_vector']} bytes per vector", ["operation", "µs"],
              [[k, round(v, 1)] for k, v in r["ops_us"].items()])
        results["torchhd"] = r
        return _dump(args, results)

    from perspective_jax.memory import hypervector as hv
    from perspective_jax.memory import memory_file as mfile
    from perspective_jax.memory import store
    from perspective_jax.memory.store import HDMemory, MemoryParams
    import jax
    rng = np.random.default_rng(args.seed)
    loads = [int(x) for x in args.loads.split(",") if x]
    probes_list = [int(x) for x in args.probes.split(",") if x]
    speed_loads = {int(x) for x in args.speed_loads.split(",") if x}
    t_start = time.perf_counter()
    acc_rows, speed_rows, q_rows, byte_rows, bool_cmp = [], [], [], [], None
    for n in loads:
        mem, keys, t_build = build(hv, HDMemory, MemoryParams, n, rng)
        cells, false = accuracy_cells(hv, mem, keys, rng, args.queries, probes_list,
                                      store=store)
        st = mem.stats()
        for c in cells:
            acc_rows.append({"pairs": n, **c, "mean_bank": st["mean_bank"],
                             "largest_bank": st["largest_bank"], "false": false})
        byte_rows.append(memory_bytes(mem, mfile, tempfile.gettempdir()))
        if n in speed_loads:
            add_us, remove_us = time_inserts(hv, mem, rng, args.inserts)
            speed_rows.append({"pairs": n, "add_many_us": us(t_build, n), "add_us": add_us,
                               "remove_us": remove_us})
            qt = time_queries(hv, store, mem, keys, rng, 200, args.batch, 8)
            for kind, v in qt.items():
                q_rows.append({"pairs": n, "kind": kind, **v})
        if n == 10_000:
            bool_cmp = bool_comparison(hv, mem, keys, rng, 100, 8)
        del mem, keys
        print(f"[{n} pairs done at {time.perf_counter() - t_start:.0f} s]", file=sys.stderr,
              flush=True)
    results["accuracy"] = acc_rows
    table("Retrieval (D = 10,000, 2,000 banks): right row / right and ≥ 0.53",
          ["pairs", "mean / largest bank", "probes", "exact", "10 % flipped", "20 % flipped",
           "30 % flipped", "unrelated ≥ 0.53"],
          [[f"{n:,}", f"{r[0]['mean_bank']:.2f} / {r[0]['largest_bank']}", pr,
            *[f"{pct(c['right'])} / {pct(c['found'])}" for c in r], pct(r[0]["false"])]
           for n in loads for pr in probes_list
           for r in [[c for c in acc_rows if c["pairs"] == n and c["probes"] == pr]]])

    pmax = max(probes_list)
    table(f"The same with the first passes off (everything in full), probes {pmax}: "
          "right / found, on → off",
          ["pairs", "exact", "10 % flipped", "20 % flipped", "30 % flipped"],
          [[f"{n:,}", *[f"{pct(c['right'])} → {pct(c['right_full'])} / "
                        f"{pct(c['found'])} → {pct(c['found_full'])}" for c in r]]
           for n in loads
           for r in [[c for c in acc_rows if c["pairs"] == n and c["probes"] == pmax]]])

    bundle_rows = []
    for n in [int(x) for x in args.bundle_loads.split(",") if x]:
        mem, keys, _ = build(hv, HDMemory, MemoryParams, n, rng, n_banks=1)
        cells, false = accuracy_cells(hv, mem, keys, rng, n, [1], (0.0, 0.1))
        bundle_rows.append({"pairs": n, "exact": cells[0], "flip10": cells[1], "false": false})
    results["one_bundle"] = bundle_rows
    table("One bundle (n_banks = 1): right row / right and ≥ 0.53",
          ["pairs", "exact keys", "10 % flipped", "mean similarity (exact, right)"],
          [[f"{r['pairs']:,}", f"{pct(r['exact']['right'])} / {pct(r['exact']['found'])}",
            f"{pct(r['flip10']['right'])} / {pct(r['flip10']['found'])}",
            f"{r['exact']['mean_similarity_right']:.4f}"] for r in bundle_rows])

    results["speed"], results["queries"] = speed_rows, q_rows
    table("Inserts (µs per pair)",
          ["pairs in the memory", "add_many", "add (one)", "remove (one)"],
          [[f"{r['pairs']:,}", r["add_many_us"], r["add_us"], r["remove_us"]]
           for r in speed_rows])
    table(f"Queries (µs per query, probes 8; batched = query_many of {args.batch}; "
          "first passes on / off)",
          ["pairs", "queries", "query (one)", "query_many", "query (one), all in full",
           "query_many, all in full"],
          [[f"{r['pairs']:,}", r["kind"], r["single_us"], r["batched_us"], r["single_us_full"],
            r["batched_us_full"]] for r in q_rows])
    tt = time_tables(hv, rng)
    results["hamming_table_us"] = {f"{k[0]}x2000 {k[1]}": v for k, v in tt.items()}
    table("hamming_table against 2,000 vectors (µs per query)",
          ["queries", "NumPy", "JAX", "used by default"],
          [[q, tt[(q, "numpy")], tt[(q, "jax")], tt[(q, "default")]] for q in (1, 64, 1024)])
    results["bytes"] = byte_rows
    table("Bytes per entry (banks included)",
          ["pairs", "memory file", "in memory", "bool per element", "bool / in memory"],
          [[f"{r['entries']:,}", round(r["file_bytes_per_entry"]),
            round(r["memory_bytes_per_entry"]), round(r["bool_bytes_per_entry"]),
            f"{r['bool_bytes_per_entry'] / r['memory_bytes_per_entry']:.1f}x"]
           for r in byte_rows])
    th = torchhd_results(args.torchhd_python)
    results["torchhd"] = th
    if isinstance(th, str):
        print(f"\ntorchhd: {th}")
    if bool_cmp:
        results["bool_per_element"] = b = bool_cmp
        tops = th.get("ops_us", {}) if isinstance(th, dict) else {}
        tcol = (lambda k: round(tops[k], 1) if k in tops else "-")
        table(f"Bool per element vs packed, {b['entries']:,} pairs (same banks: "
              f"{b['same_banks']}, same answers: {b['same_answers']}, right {pct(b['right'])})",
              ["", "NumPy bool per element", "torchhd BSC", "packed", "NumPy bool / packed"],
              [["bytes per vector", b["bytes_per_vector"][0],
                th.get("bytes_per_vector", "-") if isinstance(th, dict) else "-",
                b["bytes_per_vector"][1],
                f"{b['bytes_per_vector'][0] / b['bytes_per_vector'][1]:.2f}x"],
               ["build both bundles, s", b["build_s"][0], "-", b["build_s"][1],
                f"{b['build_s'][0] / max(b['build_s'][1], 1e-9):.1f}x"],
               ["query (one), µs", b["query_us"][0], "-", b["query_us"][1],
                f"{b['query_us'][0] / b['query_us'][1]:.1f}x"],
               *[[f"{k}, µs", v[0], tcol(k), v[1], f"{v[0] / max(v[1], 1e-9):.1f}x"]
                 for k, v in b["ops_us"].items()]])
    results["machine"] = {"cpus": os.cpu_count(), "jax": jax.__version__,
                          "numpy": np.__version__, "seconds": round(time.perf_counter() - t_start)}
    print(f"\n{results['machine']}")
    return _dump(args, results)


def _dump(args, results) -> int:
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
