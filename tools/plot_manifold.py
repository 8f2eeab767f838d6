"""Picture of the expert torus coloured by utilisation (SPEC §3.3).

Reads the latest evaluation of a routed run (RUN_DIR/metrics.jsonl, written by
`perspective-train --stage sparse|all`) and draws the lattice as Lz slices of
Lx × Ly cells, each cell an expert coloured by its share of tokens — for one
routed layer (--layer) or averaged over all of them.

    .venv/bin/python tools/plot_manifold.py runs/x/sparse [--layer 0] [--out torus.png]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from perspective_jax.config import load_config  # noqa: E402
from perspective_jax.train.metrics import read_metrics  # noqa: E402


def utilisation_grid(util: np.ndarray, lattice: tuple[int, int, int]) -> np.ndarray:
    """[E] shares → [Lz, Lx, Ly] in the flat order i·Ly·Lz + j·Lz + k."""
    lx, ly, lz = lattice
    return np.asarray(util).reshape(lx, ly, lz).transpose(2, 0, 1)


def plot(run_dir: str, layer: int | None, out: str) -> str:
    evals = [r for r in read_metrics(run_dir, "eval") if "routing" in r]
    if not evals:
        raise SystemExit(f"error: {run_dir} has no routing evaluation; is it a routed run "
                         "(--stage sparse or all) that reached an eval step?")
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    util = np.asarray(evals[-1]["routing"]["utilisation"])            # [L, E]
    if layer is not None and not 0 <= layer < len(util):
        raise SystemExit(f"error: --layer must lie in [0, {len(util)}), got {layer}")
    shares = util[layer] if layer is not None else util.mean(0)
    grid = utilisation_grid(shares, cfg.moe.lattice)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lx, ly, lz = cfg.moe.lattice
    fig, axes = plt.subplots(1, lz, figsize=(2.2 * lz + 1.5, 2.4), squeeze=False)
    vmax = max(float(grid.max()), 1e-9)
    for k in range(lz):
        ax = axes[0, k]
        im = ax.imshow(grid[k], cmap="viridis", vmin=0, vmax=vmax, origin="lower")
        ax.set_title(f"z = {k}/{lz}", fontsize=9)
        ax.set_xticks(range(ly))
        ax.set_yticks(range(lx))
        ax.set_xlabel("y")
        ax.set_ylabel("x" if k == 0 else "")
        for i in range(lx):
            for j in range(ly):
                ax.text(j, i, f"{grid[k, i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if grid[k, i, j] < vmax / 2 else "black")
    fig.colorbar(im, ax=axes.ravel().tolist(), label="share of tokens")
    which = f"layer {layer}" if layer is not None else f"mean of {len(util)} routed layers"
    fig.suptitle(f"{cfg.name}: expert utilisation on the torus, step {evals[-1]['step']} "
                 f"({which}; Gini {evals[-1]['routing']['gini']:.3f}, uniform = {1 / util.shape[1]:.3f})",
                 fontsize=9)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--layer", type=int, help="routed layer index (default: mean over layers)")
    p.add_argument("--out", help="PNG path (default RUN_DIR/torus_utilisation.png)")
    args = p.parse_args(argv)
    out = plot(args.run_dir, args.layer, args.out or os.path.join(args.run_dir,
                                                                   "torus_utilisation.png"))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
