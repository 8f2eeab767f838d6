"""Dense vs upcycled-sparse on character-level TinyShakespeare at equal wall-clock
(issue 4 measurement).

Arm A trains the dense `shakespeare-char` model for --budget-s seconds. Arm B
trains the same dense model for half the budget, upcycles it (each PDR layer's
FFN copied into moe.num_experts experts) and trains the routed model with the
balance / delta / smoothness losses for the other half. Prints validation loss
(nats/char) of both arms and the routing metrics of arm B (utilisation Gini,
adjacent-token switch shares).

    .venv/bin/python tools/bench_moe_shakespeare.py [--budget-s 150] [key=value ...]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile

from perspective_jax.cli.allocator import ensure_fast_allocator  # noqa: E402

if __name__ == "__main__":
    ensure_fast_allocator()         # before JAX starts (cli/allocator.py)

from benchlib import add_shakespeare_args, load_shakespeare_config  # noqa: E402

from perspective_jax.train.stages import stage_config, upcycle  # noqa: E402
from perspective_jax.train.trainer import train  # noqa: E402


def nats_per_char(result) -> float:
    return result.val_bits_per_char * math.log(2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shakespeare_args(p, budget_s=150.0)
    p.add_argument("--sparse-steps", type=int, default=400,
                   help="scheduled steps of the sparse half (cut by the deadline)")
    a = p.parse_args(argv)
    cfg = load_shakespeare_config(a)
    if cfg is None:
        return 2
    half = dict(steps=cfg.train.steps // 2, warmup_steps=min(cfg.train.warmup_steps,
                                                            cfg.train.steps // 4))
    root = tempfile.mkdtemp(prefix="bench-moe-")
    try:
        dense = train(cfg, os.path.join(root, "dense"), data=[a.data], progress=False,
                      deadline_s=a.budget_s)
        import dataclasses
        cfg_half = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **half))
        d_half = train(cfg_half, os.path.join(root, "dense_half"), data=[a.data],
                       progress=False, deadline_s=a.budget_s / 2)
        upcycle(cfg, os.path.join(root, "dense_half"), os.path.join(root, "upcycle"))
        sparse_cfg = stage_config(dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, steps=a.sparse_steps, warmup_steps=10)), "sparse")
        sparse = train(sparse_cfg, os.path.join(root, "sparse"), data=[a.data],
                       init_from=os.path.join(root, "upcycle"), progress=False,
                       deadline_s=a.budget_s / 2)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    r = sparse.routing
    print(f"\nTinyShakespeare char-level, {a.budget_s:.0f} s of training per arm, "
          f"{cfg.moe.num_experts} experts on a {'x'.join(map(str, cfg.moe.lattice))} torus\n")
    print("| arm | steps | wall s | val loss (nats/char) |")
    print("|---|---:|---:|---:|")
    print(f"| dense, full budget | {dense.step} | {dense.wall_s:.0f} | {nats_per_char(dense):.3f} |")
    print(f"| dense, half budget (upcycle source) | {d_half.step} | {d_half.wall_s:.0f} "
          f"| {nats_per_char(d_half):.3f} |")
    print(f"| dense half → upcycle → sparse half | {d_half.step}+{sparse.step} "
          f"| {d_half.wall_s + sparse.wall_s:.0f} | {nats_per_char(sparse):.3f} |")
    print(f"\nsparse routing: Gini {r['gini']:.3f} (target < 0.15), all reachable "
          f"{r['all_reachable']}, switches same/neighbour/other {r['switch_same']:.2f}/"
          f"{r['switch_neighbour']:.2f}/{r['switch_other']:.2f}, utilisation entropy "
          f"{r['utilisation_entropy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
