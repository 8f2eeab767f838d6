"""The safety projection (SPEC §3.9) at inference: each guarded sequence's flagged rows,
switched on from the text it has so far, as the Extensions the engine runs with.

    guard = load_guard(model_dir, manifest, engine, tokenizer)    # the model's polytope
    tail = guard.extend(b"", prompt_ids)              # the text so far (its last bytes)
    logits, state = engine.forward(prompt_ids, state, guard.extensions([tail]))
    guard.observe(engine)                             # --stats counters (Stats.safety_*)
    ext, tail = guard.prefill_extensions(b"", ids)    # every position's logits (echo)
    ext = guard.extensions(tails, enabled=on)         # a batch with unguarded rows [B]

A sequence's tail is the UTF-8 bytes its tokens add (`tokenizer.appended_bytes()`),
prompt and generated tokens alike, cut to the last `rules.tail_bytes`; the flagged
rows active after it are `FlagRules.active(tail)` (a string spread over several
tokens is stopped at the token that would finish it). The flagged rows' normals come
from the head the engine computes with (an int8 table dequantised), so every
returned logit of an active flagged token t is ≤ cap_t (within the projection's
tolerance). Rows with `enabled` False get every bound switched off: their logits are
the plain model's. `SafetyProjection`'s working set, iteration bound and tolerance
come from the polytope's metadata when it records them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np

from perspective_jax.errors import UserError
from perspective_jax.infer import polytope_loader
from perspective_jax.model.extensions import Extensions
from perspective_jax.quant.embedding_int8 import float_rows
from perspective_jax.safety.flags import FlagRules
from perspective_jax.safety.polytope import Polytope, SafetyProjection

PROJECTION_KEYS = ("working_set", "max_iters", "tol")     # SafetyProjection fields in meta


def model_polytope(model_dir: str, manifest, required: bool = False) -> Optional[Polytope]:
    """The model directory's safety polytope, or None; `required`: a one-line error
    instead of None."""
    poly = polytope_loader.load_model_polytope(model_dir, manifest)
    if poly is None and required:
        raise UserError(f"{model_dir} has no safety polytope; build one with "
                        "perspective-train --stage safety and export it")
    return poly


def load_guard(model_dir: str, manifest, engine, tokenizer) -> "SafetyGuard":
    """The guard of the model directory's polytope (required) on `engine`'s head."""
    return SafetyGuard.for_engine(model_polytope(model_dir, manifest, required=True),
                                  engine, tokenizer)


class SafetyGuard:
    """The polytope's arrays on one head, the flag rules of one tokenizer, and the
    projection (module docstring)."""

    def __init__(self, polytope: Polytope, appended: Sequence[bytes], head_table):
        rules = FlagRules.build(polytope.flagged, appended)
        if not np.array_equal(rules.token_ids, np.asarray(polytope.flag_tokens)):
            raise UserError("the safety polytope was built for another tokenizer (its "
                            "flagged tokens are not this tokenizer's); rebuild it for "
                            "this model")
        try:
            options = {k: type(getattr(SafetyProjection, k))(polytope.meta[k])
                       for k in PROJECTION_KEYS if k in polytope.meta}
        except (TypeError, ValueError):
            raise UserError(f"the safety polytope's projection settings are not numbers: "
                            f"{ {k: polytope.meta.get(k) for k in PROJECTION_KEYS} }") from None
        self.polytope, self.rules, self.appended = polytope, rules, list(appended)
        self.projection = SafetyProjection(**options)
        self.arrays = polytope.arrays(head_table)

    @classmethod
    def for_engine(cls, polytope: Polytope, engine, tokenizer) -> "SafetyGuard":
        """On the head table `engine` computes its logits with (float [V, d])."""
        table = float_rows(jax.device_get(engine.embed_table), engine.model.vocab_size)
        return cls(polytope, tokenizer.appended_bytes(), table)

    # ---------------------------------------------------------------- masks
    def extend(self, tail: bytes, ids) -> bytes:
        """The tail after the tokens `ids` are added to text ending in `tail`."""
        n = len(self.appended)
        text = tail + b"".join(self.appended[i] for i in map(int, ids) if 0 <= i < n)
        return text[-self.rules.tail_bytes:]

    def mask(self, tails: Sequence[bytes]) -> np.ndarray:
        """[B, F] bool: the flagged rows active after each tail."""
        return np.stack([self.rules.active(t) for t in tails]).reshape(len(tails), -1)

    def position_masks(self, tail: bytes, ids) -> tuple[np.ndarray, bytes]:
        """([T, F] masks, the tail after all): position i's logits (the token after
        ids[i]) are guarded as the text ending in ids[i] requires."""
        masks = []
        for tok in ids:
            tail = self.extend(tail, [tok])
            masks.append(self.rules.active(tail))
        return np.stack(masks).reshape(len(masks), -1), tail

    # ---------------------------------------------------------------- extensions
    def _with(self, base: Optional[Extensions], state) -> Extensions:
        if base is None:
            return Extensions(final_transform=self.projection, final_state=state)
        if base.final_transform is not None:
            raise UserError("the safety projection cannot be combined with another final "
                            "transform")
        return base.replace(final_transform=self.projection, final_state=state)

    def extensions(self, tails: Sequence[bytes], base: Optional[Extensions] = None,
                   enabled=None) -> Extensions:
        """`base` (None: the plain model; e.g. MPD's views) with the projection of the
        B rows whose texts end in `tails`; `enabled` [B] bool: which rows it applies
        to (None: all)."""
        return self._with(base, self.arrays.with_active(self.mask(tails), enabled))

    def prefill_extensions(self, tail: bytes, ids, base: Optional[Extensions] = None
                           ) -> tuple[Extensions, bytes]:
        """(Extensions for a feed of `ids` after text ending in `tail` whose every
        position's logits are used, [T, F] masks; the tail after it)."""
        masks, tail = self.position_masks(tail, ids)
        return self._with(base, self.arrays.with_active(masks)), tail

    # ---------------------------------------------------------------- statistics
    def observe(self, engine, rows=None) -> None:
        """Count the last feed's projections (`engine.final_info`, rows `rows` of it:
        the guarded sequences; None: all) into `engine.stats` (Stats.safety_*)."""
        info = engine.final_info
        if not info:
            return
        def pick(name):                                  # noqa: E306
            a = np.asarray(info[name]).reshape(-1)
            return a if rows is None else a[np.asarray(rows, np.int64)]
        active = pick("active").astype(bool)
        s = engine.stats
        if not active.any():                             # the common case: nothing moved
            s.safety_tokens += int(active.size)
            return
        iters = pick("iterations")
        s.safety_tokens += int(active.size)
        s.safety_active += int(active.sum())
        s.safety_iterations += int(iters[active].sum())
        s.safety_max_iterations = max(s.safety_max_iterations, int(iters.max(initial=0)))
        s.safety_max_violation = max(s.safety_max_violation,
                                     float(pick("violation").max(initial=0.0)))
        s.safety_pulled += int(pick("pulled").sum())
