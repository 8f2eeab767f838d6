"""Which expert layer j+1 will use, guessed while layer j computes (SPEC §3.5).

    predictor = Predictor("auto", n_expert_layers)
    predictor.observe(j, e)                          # layer j used expert e: score guesses
    key = predictor.predict(j, router_guess)         # (j + 1, expert) to prefetch, or None

Predictors (config.choices.PREDICTORS): "router" applies layer j+1's norm and
router to layer j's hidden state (the engine computes that guess in the same
jitted call as layer j's route and passes it in); "previous" guesses layer j+1's
expert of the previous token; "auto" uses, per layer, whichever has been right
more often so far (ties go to the router).
"""

from __future__ import annotations

import collections
from typing import Optional

from perspective_jax.config.choices import PREDICTORS


class Predictor:
    def __init__(self, mode: str, n_layers: int):
        if mode not in PREDICTORS:
            raise ValueError(f"unknown prefetch predictor {mode!r}; use one of {PREDICTORS}")
        self.mode, self.n_layers = mode, n_layers
        self.last: list[Optional[int]] = [None] * n_layers     # expert of the last token
        self._guesses: list[dict] = [{} for _ in range(n_layers)]
        self._right = [collections.Counter() for _ in range(n_layers)]

    @property
    def uses_router(self) -> bool:
        return self.mode in ("auto", "router")

    def predict(self, j: int, router_guess: Optional[int]) -> Optional[tuple[int, int]]:
        """(j+1, expert) to prefetch for this token, or None: the router's guess or layer
        j+1's expert of the previous token, whichever has been right more often there."""
        nxt = j + 1
        if nxt >= self.n_layers:
            return None
        guesses = {}
        if router_guess is not None:
            guesses["router"] = router_guess
        if self.mode in ("auto", "previous") and self.last[nxt] is not None:
            guesses["previous"] = self.last[nxt]
        if not guesses:
            return None
        self._guesses[nxt] = guesses
        best = max(guesses, key=lambda name: (self._right[nxt][name], name == "router"))
        return nxt, guesses[best]

    def observe(self, j: int, expert: int) -> None:
        """Score the guesses made for layer j against the expert it actually used."""
        for name, guess in self._guesses[j].items():
            self._right[j][name] += guess == expert
        self._guesses[j] = {}
        self.last[j] = expert
