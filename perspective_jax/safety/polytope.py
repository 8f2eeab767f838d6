"""The safety polytope (SPEC §3.9) and the final-state transform that projects onto it.

    poly = Polytope(support_normals, support_bounds, eps, flagged, flag_tokens, flag_caps,
                    interior, meta)
    arrays = poly.arrays(head_table)                  # rows for the model's own tied head
    ext = Extensions(final_transform=SafetyProjection(),
                     final_state=arrays.with_active(rules.active(tail)))

Rows, all with unit normals a_j and the half-space a_j·x ≤ b_j on x = RMSNorm(h):
  * support rows j < S: directions n_j with b_j = max over anchor states of n_j·a, plus
    the inflation ε (chosen on held-out safe text);
  * flagged rows S + f: normal E_t / |E_t| for flagged token t = flag_tokens[f] and
    bound cap_t / |E_t|, so after the projection logit_t = x·E_t ≤ cap_t. They bind
    only while active (`FlagRules.active`); an inactive row's bound is `INACTIVE`.
A batch mixing guarded and unguarded sequences (a server) gives `with_active` a
per-row `enabled` mask: a disabled row's every bound, support rows included, is
`INACTIVE`, so its state passes unchanged (bit for bit).
The flagged rows' normals come from the head the model actually uses (float or int8
table), so the cap holds for the logits it computes. `interior` is a point strictly
inside every row (all flagged rows on), the fallback target of `project`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.errors import UserError
from perspective_jax.safety.project import INACTIVE, gram_matrix, project

FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Polytope:
    support_normals: np.ndarray   # [S, d] float32, unit rows
    support_bounds: np.ndarray    # [S] float32, before ε
    eps: float                    # inflation added to every support bound
    flagged: tuple                # flagged strings (str)
    flag_tokens: np.ndarray       # [F] int32
    flag_caps: np.ndarray         # [F] float32, logit units
    interior: np.ndarray          # [d] float32
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        s, d = np.shape(self.support_normals)
        if np.shape(self.support_bounds) != (s,) or np.shape(self.interior) != (d,):
            raise UserError(f"polytope: {s} support normals of size {d} need {s} bounds and "
                            f"an interior point of size {d}")
        if np.shape(self.flag_tokens) != np.shape(self.flag_caps):
            raise UserError("polytope: one cap per flagged token")
        if not np.isfinite(self.eps) or self.eps < 0:
            raise UserError(f"polytope: inflation eps={self.eps} must be finite and >= 0")

    @property
    def d_model(self) -> int:
        return int(np.shape(self.support_normals)[1])

    def support_rows(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.asarray(self.support_normals, np.float32),
                np.asarray(self.support_bounds, np.float32) + np.float32(self.eps))

    def flag_rows(self, head_table) -> tuple[np.ndarray, np.ndarray]:
        """(normals [F, d], bounds [F]) of the flagged rows for the head `head_table`
        [V, d] (logits = x·tableᵀ)."""
        table = np.asarray(head_table, np.float32)
        if table.ndim != 2 or table.shape[1] != self.d_model:
            raise UserError(f"polytope of size {self.d_model} does not fit a head of shape "
                            f"{table.shape}")
        if len(self.flag_tokens) and int(np.max(self.flag_tokens)) >= table.shape[0]:
            raise UserError("polytope: a flagged token is outside the model's vocabulary")
        e = table[np.asarray(self.flag_tokens, np.int64)].astype(np.float64)
        norm = np.maximum(np.linalg.norm(e, axis=1), 1e-12)
        return ((e / norm[:, None]).astype(np.float32),
                (np.asarray(self.flag_caps, np.float64) / norm).astype(np.float32))

    def arrays(self, head_table, margin: float = 0.0) -> "PolytopeArrays":
        """Device arrays for `SafetyProjection`, every flagged row active; refuses when
        `interior` is not inside every row by more than `margin`."""
        sn, sb = self.support_rows()
        fn, fb = self.flag_rows(head_table)
        normals, bounds = np.concatenate([sn, fn]), np.concatenate([sb, fb])
        worst = float(np.max(normals.astype(np.float64) @ self.interior - bounds,
                             initial=-np.inf))
        if worst > -margin:
            raise UserError(f"polytope: its interior point is not inside every half-space "
                            f"(max a·c - b = {worst:.3g}); rebuild it for this model's head")
        return PolytopeArrays(jnp.asarray(normals), jnp.asarray(bounds),
                              jnp.asarray(gram_matrix(normals)),
                              jnp.asarray(self.interior, jnp.float32),
                              jnp.ones((len(fb),), bool), len(sb))


@flax.struct.dataclass
class PolytopeArrays:
    """The traced state of `SafetyProjection`: rows [m, d], bounds [m], G [m, m],
    interior [d], which flagged rows are active ([F], [B, F] or [B, T, F]) and, when
    not None, which rows of the batch the polytope applies to at all (`enabled`: the
    mask's shape without its last axis)."""

    normals: jax.Array
    bounds: jax.Array
    gram: jax.Array
    interior: jax.Array
    active: jax.Array
    n_support: int = flax.struct.field(pytree_node=False, default=0)
    enabled: Optional[jax.Array] = None

    def with_active(self, active, enabled=None) -> "PolytopeArrays":
        active = np.asarray(active, bool)        # host arrays: the jitted call moves them
        if active.shape[-1] != self.active.shape[-1]:
            raise UserError(f"flag mask of {active.shape[-1]} rows for a polytope with "
                            f"{self.active.shape[-1]} flagged rows")
        if enabled is not None:
            enabled = np.asarray(enabled, bool)
            if enabled.shape != active.shape[:-1]:
                raise UserError(f"an enabled mask of shape {enabled.shape} for a flag mask "
                                f"of shape {active.shape}")
        return self.replace(active=active, enabled=enabled)

    def positions(self, start: int, stop: int, total: int) -> "PolytopeArrays":
        """Rows start:stop of a per-position state (masks of `total` rows, one per
        position of a feed whose every position's logits are used), for one prefill
        chunk of it; a state shared by all positions is returned as it is."""
        if self.active.ndim != 2 or self.active.shape[0] != total:
            return self
        return self.replace(active=self.active[start:stop],
                            enabled=None if self.enabled is None else self.enabled[start:stop])

    def row_bounds(self, lead: tuple) -> jax.Array:
        """Bounds [*lead, m]: flagged rows that are not active get `INACTIVE`, and so
        does every row of a batch row that is not enabled."""
        per_row = len(lead) == 2 and self.active.ndim == 2   # [B, F] over (B, T): every t
        active = self.active[:, None] if per_row else self.active
        active = jnp.broadcast_to(active, (*lead, active.shape[-1]))
        flags = jnp.where(active, self.bounds[self.n_support:], INACTIVE)
        support = jnp.broadcast_to(self.bounds[: self.n_support], (*lead, self.n_support))
        out = jnp.concatenate([support, flags.astype(support.dtype)], axis=-1)
        if self.enabled is None:
            return out
        enabled = jnp.broadcast_to(self.enabled[:, None] if per_row else self.enabled, lead)
        return jnp.where(enabled[..., None], out, jnp.asarray(INACTIVE, out.dtype))


@dataclasses.dataclass(frozen=True)
class SafetyProjection:
    """Final-state transform (model.extensions): xn [B, T, d], PolytopeArrays →
    (projected xn, info {active, iterations, violation, pulled, converged} each
    [B, T])."""

    working_set: int = 16
    max_iters: int = 32
    tol: float = 1e-4
    # the info it returns: name → dtype (the engine unpacks a packed copy by these)
    INFO_DTYPES = {"active": bool, "converged": bool, "iterations": np.int32,
                   "pulled": bool, "violation": np.float32}

    def __post_init__(self):
        if self.working_set < 1 or self.max_iters < 1 or not self.tol > 0:
            raise UserError("SafetyProjection needs working_set >= 1, max_iters >= 1, tol > 0")

    def moves(self, xn: jax.Array, state: PolytopeArrays) -> jax.Array:
        """xn [B, d] → [B] bool: whether the projection would move each state (some row
        violated by more than tol); where it is False the state is returned as it is."""
        bounds = state.row_bounds(xn.shape[:-1])
        rows = jnp.dot(xn.astype(jnp.float32), state.normals.T,
                       precision=jax.lax.Precision.HIGHEST)
        return jnp.max(rows - bounds, axis=-1) > self.tol

    def idle_info(self, n: int) -> dict:
        """The info of n states it left unchanged."""
        return {"active": np.zeros(n, bool), "converged": np.ones(n, bool),
                "iterations": np.zeros(n, np.int32), "pulled": np.zeros(n, bool),
                "violation": np.zeros(n, np.float32)}

    def __call__(self, xn: jax.Array, state: Optional[PolytopeArrays]):
        if not isinstance(state, PolytopeArrays):
            raise UserError("the safety projection needs Extensions.final_state = the "
                            "polytope's arrays (Polytope.arrays)")
        lead = xn.shape[:-1]
        flat = xn.reshape(-1, xn.shape[-1]).astype(jnp.float32)
        bounds = state.row_bounds(lead).reshape(flat.shape[0], -1)
        y, info = project(flat, state.normals, bounds, state.gram, state.interior,
                          working_set=self.working_set, max_iters=self.max_iters,
                          tol=self.tol)
        return (y.reshape(xn.shape).astype(xn.dtype),
                {k: v.reshape(lead) for k, v in info.items()})


def check_fits(poly: Polytope, d_model: int, vocab_size: int, where: str) -> Polytope:
    """`poly` once it fits a model of width `d_model` and `vocab_size` tokens; else a
    one-line error naming `where` (the polytope's file)."""
    if poly.d_model != d_model:
        raise UserError(f"{where} was built for a model of width {poly.d_model}, not "
                        f"{d_model}; build the polytope for this model (perspective-train "
                        "--stage safety)")
    if len(poly.flag_tokens) and not 0 <= int(np.min(poly.flag_tokens)) <= int(
            np.max(poly.flag_tokens)) < vocab_size:
        raise UserError(f"{where} caps tokens outside this model's {vocab_size}-token "
                        "vocabulary; build the polytope for this model")
    return poly
