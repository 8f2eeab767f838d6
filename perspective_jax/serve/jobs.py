"""A request as the scheduler sees it (`Job`) and the events it sends back to the
HTTP side from its thread: `Prompt` (echo log-probabilities), `Token` (one per
generated token: id, the text it released, log-probabilities, confidence),
`Finished` (per choice), `Failed` (the whole job) and `Done`.
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Callable, NamedTuple, Optional

from perspective_jax.serve.api_errors import APIError
from perspective_jax.serve.protocol import Decoding


class TopLogprob(NamedTuple):
    id: int
    logprob: float


class Prompt(NamedTuple):
    """Echo: log-probability of each prompt token given the ones before (None for the
    first) and the top alternatives at each position."""
    prompt: int                        # which prompt of the request
    ids: list
    logprobs: list                     # [float | None]
    top: list                          # [[TopLogprob] | None]


class Token(NamedTuple):
    choice: int
    id: int
    text: str                          # text this token made final ("" while held back)
    logprob: Optional[float]
    top: Optional[list]                # [TopLogprob], with logprobs requested
    confidence: Optional[float]        # with perspective.confidence
    mpd: bool                          # MPD ran its views on this token


class Finished(NamedTuple):
    choice: int
    reason: str                        # "stop" (stop string / EOS) or "length"
    text: str                          # the choice's whole text
    tokens: int


class Failed(NamedTuple):
    error: APIError


class Done(NamedTuple):
    prompt_tokens: int
    completion_tokens: int


class Job:
    """One request: its prompts (token ids), how to decode them, where events go."""

    def __init__(self, prompts: list, decoding: Decoding, emit: Callable):
        self.prompts, self.decoding, self.emit = [list(p) for p in prompts], decoding, emit
        self.seed = (decoding.seed if decoding.seed is not None
                     else secrets.randbits(32))
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.first_token: Optional[float] = None
        self.open = len(prompts) * decoding.n          # choices not finished yet
        self.completion_tokens = 0

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.decoding.n

    def cancel(self) -> None:
        self.cancelled.set()
