"""Which expert the engine prefetches next, guessed while it computes (SPEC §3.5).

    predictor = Predictor("auto", n_expert_layers, learned=True, stats=engine.stats)
    predictor.observe(j, e)                              # layer j used e: score guesses
    key = predictor.predict(j, {"router": g, "learned": g2})   # (j + 1, expert) or None
    key = predictor.predict_first(g0)                    # (0, expert) of the next token

Predictors (config.choices.PREDICTORS): "router" applies layer j+1's norm and
router to layer j's hidden state; "learned" takes the argmax of layer j's trained
predictor head (`model.routed_ffn.ExpertPredictor`, on layer j's router input) and,
after a token's final state, of the next-token head for the next token's layer 0
— with the router's guess instead where the model directory has no trained heads;
"previous" guesses layer j+1's expert of the previous token (and, for the next
token's layer 0, this token's); "auto" uses, per layer, whichever has been right
more often so far (ties: learned, then router, then previous).
The engine computes the router and learned guesses in the same jitted call as layer
j's route (`infer.compute.route_and_guess`) and passes them in.

Every guess the engine queues is scored when its layer routes the next decode token
(a prefill in between drops it unscored): `Stats.layer_guesses[_right]` for layer
j+1 guesses, `Stats.token_guesses[_right]` for the next token's layer 0.
"""

from __future__ import annotations

import collections
from typing import Optional

from perspective_jax.config.choices import PREDICTORS

TIE_ORDER = ("previous", "router", "learned")     # a tie goes to the later one


class Predictor:
    def __init__(self, mode: str, n_layers: int, learned: bool = False, stats=None):
        if mode not in PREDICTORS:
            raise ValueError(f"unknown prefetch predictor {mode!r}; use one of {PREDICTORS}")
        self.mode, self.n_layers, self.learned, self.stats = mode, n_layers, learned, stats
        self.last: list[Optional[int]] = [None] * n_layers     # expert of the last token
        self._guesses: list[dict] = [{} for _ in range(n_layers)]
        self._made: list[Optional[int]] = [None] * n_layers     # guess queued per layer
        self._right = [collections.Counter() for _ in range(n_layers)]

    @property
    def uses_learned(self) -> bool:
        return self.learned and self.mode in ("auto", "learned")

    @property
    def uses_router(self) -> bool:
        """The router guesses: as asked, or in place of absent learned heads."""
        return self.mode in ("auto", "router") or (self.mode == "learned" and not self.learned)

    def predict(self, j: int, guesses: dict) -> Optional[tuple[int, int]]:
        """(j+1, expert) to prefetch for this token, or None. `guesses`: {"router": e,
        "learned": e} as computed for layer j+1 (those this mode uses); the previous
        token's expert is added in "auto" and "previous" mode; the one right most
        often at layer j+1 so far is taken."""
        nxt = j + 1
        if nxt >= self.n_layers:
            return None
        return self._choose(nxt, {k: v for k, v in guesses.items() if v is not None})

    def _choose(self, layer: int, guesses: dict) -> Optional[tuple[int, int]]:
        """Add the previous token's expert at `layer` ("auto", "previous"), keep the
        guesses for scoring and return (layer, the one right most often so far)."""
        if self.mode in ("auto", "previous") and self.last[layer] is not None:
            guesses["previous"] = self.last[layer]
        if not guesses:
            return None
        self._guesses[layer] = guesses
        best = max(guesses, key=lambda name: (self._right[layer][name], TIE_ORDER.index(name)))
        self._made[layer] = guesses[best]
        return layer, guesses[best]

    def predict_first(self, learned_guess: Optional[int]) -> Optional[tuple[int, int]]:
        """(0, expert) to prefetch for the next token, or None: the next-token head's
        guess (`learned_guess`, None when not computed) and, in "auto" and "previous"
        mode, this token's own layer-0 expert (routing that follows the context stays
        put); the one right most often so far is taken."""
        if not self.n_layers:
            return None
        use = learned_guess is not None and self.uses_learned
        return self._choose(0, {"learned": learned_guess} if use else {})

    def observe(self, j: int, expert: int) -> None:
        """Score the guesses made for layer j against the expert it actually used."""
        for name, guess in self._guesses[j].items():
            self._right[j][name] += guess == expert
        made, self._made[j] = self._made[j], None
        if made is not None and self.stats is not None:
            kind = "token" if j == 0 else "layer"
            setattr(self.stats, f"{kind}_guesses", getattr(self.stats, f"{kind}_guesses") + 1)
            setattr(self.stats, f"{kind}_guesses_right",
                    getattr(self.stats, f"{kind}_guesses_right") + (made == expert))
        self._guesses[j] = {}
        self.last[j] = expert

    def drop(self, j: int) -> None:
        """Forget layer j's guesses unscored (a prefill routed it instead)."""
        self._guesses[j], self._made[j] = {}, None
