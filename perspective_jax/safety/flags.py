"""Flagged strings → the token rows that would complete them, and when each is active.

    rules = FlagRules.build((b"os.system", b"eval("), appended)   # appended[t]: token t's bytes
    rules.token_ids                      # [F] tokens that can complete a flagged string
    mask = rules.active(tail)            # [F] bool for the text so far (its last bytes)

Token t's row is active when emitting t would make the text contain a flagged string
s that it did not contain before, i.e. when
  * t's text contains s (always active), or
  * t's text starts with the last k bytes of s (0 < k < len(s)) and the text so far
    ends with the rest, s[:len(s) − k].
A string spread over several tokens is thus stopped at the token that would finish
it, whatever split the model takes; tokens in the middle of a flagged string are
left alone (they may begin safe text too). Matching is on UTF-8 bytes and on raw
substrings ("kill" also matches inside "skill": list what you mean).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from perspective_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class FlagRules:
    strings: tuple          # the flagged strings (bytes)
    token_ids: np.ndarray   # [F] int32
    always: np.ndarray      # [F] bool
    prefixes: tuple         # (prefix bytes, rows [int array]) for each distinct prefix
    tail_bytes: int         # how many trailing bytes of the text `active` needs

    @classmethod
    def build(cls, strings: Sequence, appended: Sequence[bytes]) -> "FlagRules":
        """`appended[t]`: the bytes token t adds to the text (b"" for special tokens)."""
        flagged = tuple(dict.fromkeys(s.encode("utf-8") if isinstance(s, str) else bytes(s)
                                      for s in strings))
        if not flagged or any(not s for s in flagged):
            raise UserError("the flagged list needs one or more non-empty strings")
        always, needs = {}, {}
        for t, text in enumerate(appended):
            if not text:
                continue
            for s in flagged:
                if s in text:
                    always[t] = True
                    continue
                for k in range(1, min(len(text), len(s) - 1) + 1):
                    if text.startswith(s[len(s) - k:]):
                        needs.setdefault(t, set()).add(s[:len(s) - k])
        ids = sorted(set(always) | set(needs))
        row = {t: r for r, t in enumerate(ids)}
        by_prefix: dict = {}
        for t, prefixes in needs.items():
            if t in always:
                continue
            for p in prefixes:
                by_prefix.setdefault(p, []).append(row[t])
        return cls(flagged, np.asarray(ids, np.int32),
                   np.asarray([t in always for t in ids], bool),
                   tuple((p, np.asarray(sorted(r), np.int64))
                         for p, r in sorted(by_prefix.items())),
                   max((len(s) for s in flagged), default=1))

    @property
    def size(self) -> int:
        return len(self.token_ids)

    def active(self, tail: bytes) -> np.ndarray:
        """[F] bool: which rows are active after the text ending with `tail`."""
        mask = self.always.copy()
        for prefix, rows in self.prefixes:
            if tail.endswith(prefix):
                mask[rows] = True
        return mask

    def completes(self, tail: bytes, token_text: bytes) -> bool:
        """Whether appending `token_text` to text ending in `tail` creates a flagged
        string (the rule `active` encodes, written out: a second implementation)."""
        tail = tail[-(self.tail_bytes - 1):] if self.tail_bytes > 1 else b""
        return finishes(tail, token_text, self.strings)


def finishes(before, added, strings) -> bool:
    """Whether `before + added` holds an occurrence of one of `strings` that ends inside
    `added` (a flagged string the addition makes); str or bytes alike."""
    joined = before + added
    return any(s in joined[max(0, len(before) - len(s) + 1):] for s in strings)


def emitted(text: bytes, strings: Sequence[bytes]) -> bool:
    """Whether `text` contains any flagged string."""
    return any(s in text for s in strings)
