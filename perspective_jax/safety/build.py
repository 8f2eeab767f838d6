"""Building the safety polytope from safe states (the `safety` stage, SPEC §3.9).

    poly, report = build_polytope(fit, heldout, head_table, rules, cfg.safety)

fit [N, d], heldout [M, d]: final states x = RMSNorm(h) (what the head sees) at the
positions of safe text, the held-out ones from text the fit did not see.
  1. anchors: k-means (k-means++ seeding, Lloyd) of the fit states into `anchors` centres;
  2. directions: the top `pca_directions` principal directions of the anchors and
     `random_directions` Gaussian ones, each with both signs; support rows
     n·x ≤ b = max_i n·a_i over the anchors (the anchor set's support function);
  3. ε: the (1 − fp_target) quantile over held-out states of max_j (n_j·x − b_j), so
     at most fp_target of unseen safe states fall outside the support rows;
  4. flagged rows: every token of `rules` capped at logit `cap` (cfg.flag_cap, or the
     flag_quantile quantile of the fit states' top logit minus flag_margin), i.e.
     E_t·x ≤ cap — below the top logit of nearly every safe state;
  5. interior: the anchors' mean projected (Dykstra) into the polytope shrunk by a
     margin, so it is strictly inside every row with every flagged row on.
"""

from __future__ import annotations

import numpy as np

from perspective_jax.config import SafetyConfig
from perspective_jax.errors import UserError
from perspective_jax.safety.flags import FlagRules
from perspective_jax.safety.polytope import FORMAT_VERSION, Polytope

KMEANS_ITERS = 25
INTERIOR_MARGIN = 0.5      # logits the interior point keeps below every flagged cap


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = KMEANS_ITERS):
    """Centres [k, d] of x [N, d] (k-means++ seeding, then Lloyd's iterations)."""
    x = np.asarray(x, np.float64)
    n = len(x)
    k = min(k, n)
    centres = [x[rng.integers(n)]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else None
        centres.append(x[rng.choice(n, p=p)])
        d2 = np.minimum(d2, ((x - centres[-1]) ** 2).sum(1))
    c = np.stack(centres)
    sq = (x ** 2).sum(1)
    for _ in range(iters):
        assign = np.argmin(sq[:, None] - 2 * x @ c.T + (c ** 2).sum(1)[None], axis=1)
        counts = np.bincount(assign, minlength=k)
        sums = np.zeros_like(c)
        np.add.at(sums, assign, x)
        moved = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], c)
        if np.allclose(moved, c):
            break
        c = moved
    return c


def directions(anchors: np.ndarray, n_pca: int, n_random: int,
               rng: np.random.Generator) -> np.ndarray:
    """Unit directions [2·(n_pca' + n_random), d]: principal directions of the anchors
    (n_pca' ≤ n_pca, as many as the anchors span) and random ones, both signs each."""
    d = anchors.shape[1]
    centred = anchors - anchors.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    keep = int(min(n_pca, np.sum(s > 1e-9 * max(s.max(initial=0), 1e-30))))
    rand = rng.standard_normal((n_random, d))
    dirs = np.concatenate([vt[:keep], rand])
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return np.concatenate([dirs, -dirs])


def _interior(anchors, normals, bounds, margins) -> np.ndarray:
    """A point strictly inside every row: the anchors' mean, projected onto the
    polytope with every bound lowered by its margin (float64 Dykstra in numpy)."""
    c = anchors.mean(0)
    target = bounds - margins
    if np.max(normals @ c - target) <= 0:
        return c
    y, incr = c.copy(), np.zeros(len(normals))
    for _ in range(2000):
        for j in np.flatnonzero((normals @ y - target > 0) | (incr > 0)):
            z = y + incr[j] * normals[j]
            incr[j] = max(normals[j] @ z - target[j], 0.0)
            y = z - incr[j] * normals[j]
        if np.max(normals @ y - target) <= 1e-9:
            break
    return y


def build_polytope(fit: np.ndarray, heldout: np.ndarray, head_table: np.ndarray,
                   rules: FlagRules, cfg: SafetyConfig) -> tuple[Polytope, dict]:
    """(the polytope, a report of its numbers); module docstring for the steps."""
    fit, heldout = np.asarray(fit, np.float64), np.asarray(heldout, np.float64)
    table = np.asarray(head_table, np.float64)
    if fit.ndim != 2 or heldout.ndim != 2 or fit.shape[1] != heldout.shape[1]:
        raise UserError(f"safety: states must be [N, d]; got {fit.shape} and {heldout.shape}")
    if len(fit) < 2 or len(heldout) < 1:
        raise UserError(f"safety: {len(fit)} fit and {len(heldout)} held-out safe states are "
                        "too few; give more safe text (--safe-data)")
    if table.shape[1] != fit.shape[1]:
        raise UserError(f"safety: head of width {table.shape[1]} for states of width "
                        f"{fit.shape[1]}")
    rng = np.random.default_rng(cfg.seed)
    anchors = kmeans(fit, cfg.anchors, rng)
    normals = directions(anchors, cfg.pca_directions, cfg.random_directions, rng)
    bounds = (anchors @ normals.T).max(0)
    out_held = (heldout @ normals.T - bounds).max(1)
    eps = float(max(np.quantile(out_held, 1.0 - cfg.fp_target), 0.0)) if cfg.fp_target < 1 else 0.0
    top = (fit @ table.T).max(1)
    cap = (float(cfg.flag_cap) if cfg.flag_cap is not None
           else float(np.quantile(top, cfg.flag_quantile)) - cfg.flag_margin)
    tokens = np.asarray(rules.token_ids, np.int64)
    e = table[tokens]
    e_norm = np.maximum(np.linalg.norm(e, axis=1), 1e-12)
    all_normals = np.concatenate([normals, e / e_norm[:, None]])
    all_bounds = np.concatenate([bounds + eps, np.full(len(tokens), cap) / e_norm])
    spread = float(np.median(bounds - anchors.mean(0) @ normals.T))
    margins = np.concatenate([np.full(len(normals), 0.05 * max(spread, 1e-6)),
                              INTERIOR_MARGIN / e_norm])
    interior = _interior(anchors, all_normals, all_bounds, margins)
    worst = float(np.max(all_normals @ interior - all_bounds))
    if worst > -1e-6:
        raise UserError(f"safety: no safe state satisfies every flagged cap at {cap:.2f} "
                        f"(max a·c - b = {worst:.3g}); raise safety.flag_cap or lower "
                        "safety.flag_margin")
    report = {
        "format_version": FORMAT_VERSION, "fit_states": len(fit),
        "heldout_states": len(heldout), "anchors": len(anchors),
        "support_rows": len(normals), "flagged_rows": len(tokens), "eps": eps,
        "heldout_outside_before_eps": float(np.mean(out_held > 0)),
        "heldout_outside_after_eps": float(np.mean(out_held > eps)),
        "fit_outside_after_eps": float(np.mean((fit @ normals.T - bounds).max(1) > eps)),
        "flag_cap_logit": cap, "top_logit_quantile": float(np.quantile(top, cfg.flag_quantile)),
        "fit_states_over_cap": float(np.mean((fit @ e.T).max(1, initial=-np.inf) > cap)),
        "interior_slack": -worst, "working_set": cfg.working_set, "max_iters": cfg.max_iters,
    }
    poly = Polytope(normals.astype(np.float32), bounds.astype(np.float32), eps,
                    tuple(s.decode("utf-8", "replace") for s in rules.strings),
                    tokens.astype(np.int32), np.full(len(tokens), cap, np.float32),
                    interior.astype(np.float32), report)
    return poly, report
