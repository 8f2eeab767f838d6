"""Text ↔ token ids as the server shows them.

    ids = encode(tokenizer, "Hello</s>")      # "</s>" → the EOS id, as HF tokenizers do
    token_text(tokenizer, id)                 # "H", "</s>", or "bytes:\\xe2" for a lone byte

The special tokens' texts (`special_tokens`) are recognised in prompts, chat
messages and /tokenize, so `GET /tokenizer_info`'s `eos_token` round-trips through
`/tokenize` (what lm-evaluation-harness's remote tokenizer relies on); everything
else is the model's own tokenizer (`encode` of the byte or sentencepiece tokenizer).
A byte that is not a whole UTF-8 character on its own is shown as `bytes:\\xNN`
(OpenAI's convention), so different ids never share a token string.
"""

from __future__ import annotations

import re

import numpy as np

from perspective_jax.data.byte_tokenizer import ByteTokenizer


def special_tokens(tokenizer) -> dict:
    """{text: id} of the tokenizer's special tokens (padding, begin, end of text)."""
    if isinstance(tokenizer, ByteTokenizer):
        return {"<pad>": ByteTokenizer.PAD, "<s>": ByteTokenizer.BOS,
                "</s>": ByteTokenizer.EOS}
    sp = tokenizer._sp
    out = {}
    for i in (sp.pad_id(), sp.bos_id(), sp.eos_id()):
        if 0 <= i < tokenizer.vocab_size:
            out[sp.id_to_piece(i)] = i
    return out


def special_text(tokenizer, token_id: int) -> str | None:
    for text, i in special_tokens(tokenizer).items():
        if i == token_id:
            return text
    return None


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, its special-token texts mapped to their ids."""
    specials = special_tokens(tokenizer)
    if not specials or not any(s in text for s in specials):
        return tokenizer.encode(text).tolist()
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    ids: list[int] = []
    for part in re.split(pattern, text):
        if part in specials:
            ids.append(specials[part])
        elif part:
            ids.extend(tokenizer.encode(part).tolist())
    return ids


def decode(tokenizer, ids) -> str:
    """Text of token ids (special tokens are not shown, as generated text shows them)."""
    return tokenizer.decode(np.asarray(list(ids), np.int64))


def token_text(tokenizer, token_id: int) -> str:
    """One token as a string (module docstring)."""
    special = special_text(tokenizer, token_id)
    if special is not None:
        return special
    if isinstance(tokenizer, ByteTokenizer):
        return chr(token_id) if token_id < 0x80 else f"bytes:\\x{token_id:02x}"
    return tokenizer.decode(np.asarray([token_id]))


def token_bytes(tokenizer, token_id: int) -> list[int]:
    """One token's UTF-8 bytes (the raw byte for the byte tokenizer)."""
    if isinstance(tokenizer, ByteTokenizer) and token_id < 256:
        return [token_id]
    return list(token_text(tokenizer, token_id).encode("utf-8"))
