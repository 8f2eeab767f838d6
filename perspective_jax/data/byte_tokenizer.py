"""Byte-level tokenizer: UTF-8 bytes 0–255 plus specials, lossless on any text.

ids 0..255 are bytes; PAD = 256, BOS = 257, EOS = 258 (vocab 259).
"""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    PAD, BOS, EOS = 256, 257, 258
    vocab_size = 259
    eos_id = EOS

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def appended_bytes(self) -> list[bytes]:
        """[vocab] the byte each token adds (b"" for the special tokens)."""
        return [bytes([i]) for i in range(256)] + [b""] * (self.vocab_size - 256)
