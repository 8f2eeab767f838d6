"""Rails for online adaptation (SPEC §3.8): the adapted state (adapters, expert
coordinates: any pytree) is checkpointed before each update; an update that takes
MPD's agreement on recent tokens below `agreement_floor` × its baseline, or the
held-out loss more than `max_loss_rise` nats above its baseline, is rolled back.

    rails = Rails(RailsConfig(), baseline_agreement=0.8, baseline_loss=2.1)
    rails.checkpoint(state)                    # before the update
    state = update(state)
    state, why = rails.judge(state, agreement=0.3, loss=2.2)   # why: None or a reason

`agreement` is the share of recent MPD-triggered tokens the views agreed on (higher
is better); a rollback returns the checkpoint exactly (a deep copy of its arrays)
and is counted with its reason (`rollbacks`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import numpy as np

from perspective_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class RailsConfig:
    agreement_floor: float = 0.5
    max_loss_rise: float = 0.1

    def __post_init__(self):
        if not 0.0 <= self.agreement_floor <= 1.0:
            raise UserError(f"rails agreement_floor {self.agreement_floor}: must lie in [0, 1]")
        if self.max_loss_rise < 0:
            raise UserError(f"rails max_loss_rise {self.max_loss_rise}: must be >= 0")


class Rails:
    def __init__(self, cfg: RailsConfig, baseline_agreement: float, baseline_loss: float):
        self.cfg = cfg
        self.baseline_agreement, self.baseline_loss = baseline_agreement, baseline_loss
        self.saved: Any = None
        self.rollbacks: list[str] = []

    def checkpoint(self, state) -> None:
        """Keep a copy of `state` (numpy arrays), what a rollback returns."""
        self.saved = jax.tree.map(lambda a: np.array(a, copy=True), state)

    def verdict(self, agreement: float, loss: float) -> Optional[str]:
        """Why the state after an update is off the rails, or None."""
        floor = self.cfg.agreement_floor * self.baseline_agreement
        if not np.isfinite(loss) or loss > self.baseline_loss + self.cfg.max_loss_rise:
            return (f"held-out loss {loss:.4f} rose past {self.baseline_loss:.4f} + "
                    f"{self.cfg.max_loss_rise:g}")
        if agreement < floor:
            return f"MPD agreement {agreement:.3f} fell below {floor:.3f}"
        return None

    def judge(self, state, agreement: float, loss: float):
        """(the state to keep, the reason it was rolled back or None)."""
        why = self.verdict(agreement, loss)
        if why is None:
            return state, None
        if self.saved is None:
            raise UserError("rails: an update was judged before any checkpoint")
        self.rollbacks.append(why)
        return jax.tree.map(lambda a: np.array(a, copy=True), self.saved), why
