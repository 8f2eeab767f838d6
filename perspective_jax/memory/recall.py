"""Texts in and out of a memory, and the recall MPD consults when its perspectives
disagree (SPEC §3.6 "no majority → consult HDM", §3.7).

    codec = TextCodec(tokenize, embed_rows, codebook)      # from the model's own embedding
    key_hv = codec.encode("the capital of Zorbin")
    recall = MemoryRecall(memory_file, codec, RecallConfig(), n_layers=8)
    got = recall(context_ids)      # Recalled(row, value, similarity, vector) or None

A text's representation is the mean of the model's input rows for its tokens
(`embed_rows(ids) → [T, d]`, the embedding × √d as the residual stream starts):

    r(text) = mean_t embed_rows(ids)_t ,   hv(text) = codebook(r(text))

`MemoryRecall` queries with the last `window` tokens of the context, takes the
nearest value when its similarity is at least `min_similarity`, and returns the
vector to inject, added to the residual stream of the decided position after
`inject_layer` (default: the middle layer, (L − 1) // 2) — the value enters as a
virtual token would:

    inject = "next_token": inject_scale · embed_rows(v_k),  k = how much of the value
             the context already ends with (`matched_prefix`), so a value is said
             token by token; none once it is complete
    inject = "mean":       inject_scale · r(value)

"next_token" is the default: on the Quickstart model it raised the value tokens'
probability far more than the mean (docs/benchmarks.md, issue 25). It counts
lookups, hits and injections (`counts`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable, NamedTuple, Optional

import numpy as np

from perspective_jax.config.choices import INJECT_MODES
from perspective_jax.errors import UserError
from perspective_jax.memory.codebook import Codebook
from perspective_jax.memory.memory_file import MemoryFile


@dataclasses.dataclass(frozen=True)
class RecallConfig:
    """How decoding consults a memory: candidate banks (`probes`), the similarity a
    value needs to count as found (`min_similarity`; unrelated ≈ 0.5, unrelated text
    of the same kind up to ~0.6 on the Quickstart model: docs/benchmarks.md), the
    context tokens a query is made of (`window`), the injected vector's scale, the
    layer after which it is added (None: the middle layer), and what is injected
    (`inject`, INJECT_MODES; module docstring)."""

    probes: int = 8
    min_similarity: float = 0.65
    window: int = 32
    inject_scale: float = 4.0
    inject_layer: Optional[int] = None
    inject: str = "next_token"

    def __post_init__(self):
        if self.inject not in INJECT_MODES:
            raise UserError(f"memory inject {self.inject!r}: use one of {INJECT_MODES}")
        if not 1 <= self.probes <= 4096:
            raise UserError(f"memory probes {self.probes}: must lie in 1..4096")
        if not 0.5 <= self.min_similarity <= 1.0:
            raise UserError(f"memory min_similarity {self.min_similarity}: must lie in "
                            "[0.5, 1] (0.5 is what unrelated vectors score)")
        if self.window < 1:
            raise UserError(f"memory window {self.window}: must be >= 1 token")
        if not 0.0 < self.inject_scale <= 100.0:
            raise UserError(f"memory inject_scale {self.inject_scale}: must lie in (0, 100]")
        if self.inject_layer is not None and self.inject_layer < 0:
            raise UserError(f"memory inject_layer {self.inject_layer}: must be >= 0")


class TextCodec:
    """tokenize(text) → ids; embed_rows(ids [T]) → [T, d] float; the codebook."""

    def __init__(self, tokenize: Callable, embed_rows: Callable, codebook: Codebook):
        self.tokenize, self.embed_rows, self.codebook = tokenize, embed_rows, codebook

    def represent_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids, np.int32).reshape(-1)
        if ids.size == 0:
            raise UserError("an empty text has no representation; give some text")
        return np.asarray(self.embed_rows(ids), np.float32).mean(axis=0)

    def represent(self, text: str) -> np.ndarray:
        """r(text) [d] (module docstring)."""
        return self.represent_ids(self.tokenize(text))

    def encode(self, text: str) -> np.ndarray:
        return self.codebook.encode(self.represent(text))

    def encode_ids(self, ids) -> np.ndarray:
        return self.codebook.encode(self.represent_ids(ids))


def vocabulary_centre(embed_rows: Callable, vocab_size: int, block: int = 1024) -> np.ndarray:
    """Mean input row over the vocabulary [d]: the codebook's centre."""
    total, n = None, 0
    for i in range(0, vocab_size, block):
        rows = np.asarray(embed_rows(np.arange(i, min(vocab_size, i + block), dtype=np.int32)),
                          np.float64)
        total = rows.sum(0) if total is None else total + rows.sum(0)
        n += len(rows)
    return (total / n).astype(np.float32)


def matched_prefix(context, value_ids) -> int:
    """The longest k such that `context` ends with value_ids[:k] (how much of the
    value the text has already said)."""
    context = list(context)
    for k in range(min(len(context), len(value_ids)), 0, -1):
        if context[-k:] == list(value_ids[:k]):
            return k
    return 0


def _file_key(path: Optional[str]):
    """(inode, size, mtime) of `path`, None when there is none."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class Recalled(NamedTuple):
    row: int
    value: str
    similarity: float
    vector: np.ndarray          # [d] float32, what is injected


class MemoryRecall:
    def __init__(self, memory_file: MemoryFile, codec: TextCodec, cfg: RecallConfig,
                 n_layers: int, path: Optional[str] = None,
                 reload: Optional[Callable[[str], MemoryFile]] = None):
        self.file, self.codec, self.cfg = memory_file, codec, cfg
        self.path, self._reload = path, reload
        self._seen = _file_key(path)
        layer = (n_layers - 1) // 2 if cfg.inject_layer is None else cfg.inject_layer
        if layer >= n_layers:
            raise UserError(f"memory inject_layer {layer}: the model has layers "
                            f"0..{n_layers - 1}")
        self.inject_layer = layer
        self.counts = {"lookups": 0, "hits": 0, "injections": 0}
        self.last: Optional[Recalled] = None

    def refresh(self) -> bool:
        """Re-read the memory file when it was replaced since it was read (a writer
        such as perspective-memory saves by rename); True when it was. A file that
        cannot be read now (damaged, another model's) keeps the memory as it was, with
        one warning on stderr."""
        if self.path is None or self._reload is None:
            return False
        key = _file_key(self.path)
        if key == self._seen:
            return False
        self._seen = key
        try:
            self.file = self._reload(self.path)
        except UserError as exc:
            print(f"warning: {exc}; the memory read before is kept", file=sys.stderr)
            return False
        return True

    def __call__(self, context_ids) -> Optional[Recalled]:
        """The value recalled for the last `window` tokens of `context_ids`, or None."""
        self.refresh()
        ids = list(context_ids)[-self.cfg.window:]
        self.counts["lookups"] += 1
        self.last = None
        if not ids or len(self.file.memory) == 0:
            return None
        hit = self.file.memory.query(self.codec.encode_ids(ids), self.cfg.probes)
        if hit is None or hit.similarity < self.cfg.min_similarity:
            return None
        self.counts["hits"] += 1
        value = self.file.memory.texts[hit.row][1]
        value_ids = [int(t) for t in self.codec.tokenize(value)] if value else []
        if self.cfg.inject == "next_token":
            value_ids = value_ids[matched_prefix(ids, value_ids):][:1]
        if len(value_ids) == 0:                    # nothing (left) to inject
            return None
        vec = self.cfg.inject_scale * self.codec.represent_ids(value_ids)
        self.last = Recalled(hit.row, value, hit.similarity, vec.astype(np.float32))
        return self.last

    def injected(self) -> None:
        """Count one injection (the caller injected the last recalled vector)."""
        self.counts["injections"] += 1
