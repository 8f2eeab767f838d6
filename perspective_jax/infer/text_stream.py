"""Generated text as it becomes final: decoded from the tokens so far, cut before
the first stop string, and released only when no later token can change it.

    stream = TextStream(tokenizer, stop=["\\n\\n"])
    delta, stopped = stream.push(token_id, last=False)   # new final text; a stop hit?
    stream.text                                          # everything final so far

Text is held back while it ends in a split UTF-8 character or in what may be the
start of a stop string; `push(..., last=True)` (the final token: EOS, max_tokens)
releases the rest. Used by `infer.session.Conversation` and by the server's
scheduler, so both cut and stream text by one rule.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def streamable(text: str, stop: Sequence[str]) -> str:
    """The part of `text` that can be shown while generation goes on: without a split
    UTF-8 character at its end, nor an end that may be the start of a stop string."""
    text = text.rstrip("\ufffd")
    held = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return text[: len(text) - held]


def first_stop(text: str, stop: Sequence[str]) -> int:
    """Index of the earliest stop string in `text` (−1 when none occurs)."""
    return min((text.find(s) for s in stop if s and s in text), default=-1)


class TextStream:
    """Tokens in, final text out (module docstring)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.shown = ""           # text released so far
        self.decoded = ""         # all tokens decoded (uncut)
        self.stopped = False

    def push(self, token: int, last: bool = False) -> tuple[str, bool]:
        """Add one generated token; returns (text newly final, whether a stop string
        now ends the text). After a stop (or `last`) the text is complete."""
        self.ids.append(int(token))
        self.decoded = self.tokenizer.decode(np.asarray(self.ids))
        cut = first_stop(self.decoded, self.stop)
        text = self.decoded if cut < 0 else self.decoded[:cut]
        self.stopped = cut >= 0
        stable = text if (self.stopped or last) else streamable(text, self.stop)
        if len(stable) > len(self.shown) and stable.startswith(self.shown):
            delta, self.shown = stable[len(self.shown):], stable
            return delta, self.stopped
        return "", self.stopped

    @property
    def text(self) -> str:
        return self.shown
