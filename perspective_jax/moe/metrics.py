"""Routing metrics (SPEC §3.3): utilisation, variance, Gini, entropy, switch kinds."""

from __future__ import annotations

import numpy as np


def gini(values) -> float:
    """Gini coefficient of non-negative values (0 = perfectly even, →1 = one holds all)."""
    v = np.sort(np.asarray(values, np.float64).ravel())
    n = v.size
    if n == 0 or v.sum() == 0:
        return 0.0
    ranks = np.arange(1, n + 1)
    return float((2 * np.sum(ranks * v) / (n * v.sum())) - (n + 1) / n)


def routing_report(counts, switches, entropy: float | None = None) -> dict:
    """counts: [L, E] tokens per expert per routed layer; switches: [3] adjacent-token
    switch counts (same, neighbour, other)."""
    counts = np.asarray(counts, np.float64)
    util = counts / np.maximum(counts.sum(-1, keepdims=True), 1.0)       # [L, E]
    share = util.mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(share > 0, share * np.log(share), 0.0))
    sw = np.asarray(switches, np.float64)
    sw = sw / max(sw.sum(), 1.0)
    report = {
        "utilisation": util.round(5).tolist(),
        "utilisation_variance": float(util.var(-1).mean()),
        "gini": float(np.mean([gini(u) for u in util])),
        "utilisation_entropy": float(ent / np.log(counts.shape[-1])),
        "all_reachable": bool((counts > 0).all()),
        "switch_same": float(sw[0]), "switch_neighbour": float(sw[1]),
        "switch_other": float(sw[2]),
    }
    if entropy is not None:
        report["routing_entropy"] = float(entropy)
    return report
