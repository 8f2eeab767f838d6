"""Host-side delta decode rates: how fast a delta record becomes its target region.

For each region size — the test models' (d 32 / ff 64 … 37 KB at the locality
benchmark's 128/384), a mid-size one, and the 1.05T model's (`curricula/
perspective-1t.yaml`) — a random ternary source region and a target that differs in
`--share` of its bytes (one trit per changed byte, as hub deltas mostly do, or all
random trits with `--random-bytes`), each encoded as positions, bitmap and fields
(`modeldir.format.delta_record`); then the median time of `parse_delta` and of
applying the result (`apply_delta`) over `--repeats` runs, and the rate in MB of
region per second. What `infer.expert_store.ExpertStore.region_from_delta` costs on
the I/O thread beyond the read.

    python tools/bench_delta_decode.py [--share 0.25] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from benchlib import REPO

from perspective_jax.config import load_config
from perspective_jax.modeldir import format as md

SHIFTS = np.arange(0, 8, 2, dtype=np.uint8)


def trit_region(rng, n: int) -> np.ndarray:
    """n bytes of four 2-bit trit codes (0..2) each."""
    codes = rng.integers(0, 3, (n, 4)).astype(np.uint8)
    return np.bitwise_or.reduce(codes << SHIFTS, axis=1).astype(np.uint8)


def changed_target(rng, src: np.ndarray, share: float, random_bytes: bool) -> np.ndarray:
    """src with `share` of its bytes changed: one trit field each, or random trits."""
    dst = src.copy()
    at = rng.choice(src.size, int(share * src.size), replace=False)
    if random_bytes:                         # random trits; a byte left equal moves
        new = trit_region(rng, at.size)      # its lowest one
        same = new == src[at]
        dst[at] = np.where(same, (new & 0xFC) | ((new & 3) + 1) % 3, new)
        return dst
    shift = 2 * rng.integers(0, 4, at.size).astype(np.uint8)
    old = (src[at] >> shift) & 3
    new = (old + rng.integers(1, 3, at.size).astype(np.uint8)) % 3
    dst[at] = (src[at] & ~(np.uint8(3) << shift)) | (new << shift)
    return dst


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--share", type=float, default=0.25,
                   help="share of the region's bytes the delta changes (default 0.25)")
    p.add_argument("--random-bytes", action="store_true",
                   help="a changed byte gets random trits (default: one trit changes)")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    big = load_config(os.path.join(REPO, "curricula", "perspective-1t.yaml"), []).model
    sizes = [("locality bench (128/384)", md.RegionLayout(128, 384).nbytes),
             ("mid (1024/2816)", md.RegionLayout(1024, 2816).nbytes),
             (f"1.05T ({big.d_model}/{big.d_ff})",
              md.RegionLayout(big.d_model, big.d_ff).nbytes)]
    rng = np.random.default_rng(0)
    print(f"changed bytes: {a.share:.0%} ({'random trits' if a.random_bytes else 'one trit'}"
          " each); median of", a.repeats, "runs\n")
    print("| region | encoding | record / region | parse ms | apply ms | MB/s of region |")
    print("|---|---|---|---|---|---|")
    for name, n in sizes:
        src = trit_region(rng, n)
        dst = changed_target(rng, src, a.share, a.random_bytes)
        pos, val = md.encode_delta(src, dst)
        for enc in md.DELTA_ENCODINGS:
            rec = md.delta_record(pos, val, enc, n, src)
            got = md.parse_delta(rec, enc, len(pos), n, src)
            assert np.array_equal(md.apply_delta(src, *got), dst), enc
            parse = median_ms(lambda: md.parse_delta(rec, enc, len(pos), n, src), a.repeats)
            apply = median_ms(lambda: md.apply_delta(src, *got), a.repeats)
            print(f"| {name}, {n / 1e6:.3f} MB | {enc} | {len(rec) / n:.0%} | {parse:.2f} | "
                  f"{apply:.2f} | {n / 1e6 / ((parse + apply) / 1e3):,.0f} |")


if __name__ == "__main__":
    main()
