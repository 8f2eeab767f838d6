"""Tokenizers with one interface: `encode(str) -> int32 ids`, `decode(ids) -> str`,
`vocab_size`, `eos_id`. Both are lossless on arbitrary Unicode.

* `ByteTokenizer` — UTF-8 bytes (character-level benchmarks).
* `SentencePieceTokenizer` — BPE trained on the corpus with byte fallback and
  identity normalisation, saved in the run directory and reused.

A tokenizer may have fewer ids than model.vocab_size (sentencepiece stops early on a
narrow corpus); `load_or_train` says so in one line before training and every token
choice stays below the tokenizer's `vocab_size` (`model.sampling.sample_next`).
"""

from __future__ import annotations

import os
import random
import sys
from typing import Iterable, Optional

import numpy as np

from perspective_jax.data.byte_tokenizer import ByteTokenizer
from perspective_jax.errors import UserError
from perspective_jax.fileio import atomic_write

SPM_FILE = "tokenizer.model"
BYTE_MARKER = "tokenizer.byte"


class SentencePieceTokenizer:
    def __init__(self, model_file: str):
        import sentencepiece as spm
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_file)
        except (OSError, RuntimeError, ValueError) as exc:   # ValueError: undecodable pieces
            raise UserError(f"cannot load tokenizer {model_file} (damaged or not a "
                            f"tokenizer: {' '.join(str(exc).split())[:120]})") from None
        self.path = model_file
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, np.int32) for ids in self._sp.encode(texts)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the {self.vocab_size} pieces of "
                            f"the tokenizer {self.path}; it belongs to another model")
        return self._sp.decode(ids)

    def appended_bytes(self) -> list[bytes]:
        """[vocab] the UTF-8 bytes each token adds in the middle of a text ('\u2581' →
        space, byte pieces <0xNN> → that byte, control and unknown pieces → b"")."""
        sp, out = self._sp, []
        for i in range(self.vocab_size):
            piece = sp.id_to_piece(i)
            if sp.is_control(i) or sp.is_unknown(i):
                out.append(b"")
            elif sp.is_byte(i):
                out.append(bytes([int(piece[3:-1], 16)]))
            else:
                out.append(piece.replace(_SPACE, " ").encode("utf-8"))
        return out


# sentencepiece drops training sentences longer than this many bytes; lines are cut
# into pieces of _MAX_LINE_CHARS characters (<= 4 bytes each) so none is dropped.
_MAX_SENTENCE_BYTES = 1 << 16
_MAX_LINE_CHARS = _MAX_SENTENCE_BYTES // 4
# sentencepiece's space symbol; always a piece, else a corpus with few spaces (numbers)
# byte-encodes it and decoding turns every space into a literal '\u2581'.
_SPACE = "\u2581"


def _training_lines(texts: Iterable[str], max_lines: int, seed: int) -> list[str]:
    lines = [line[i:i + _MAX_LINE_CHARS] for text in texts
             for line in text.splitlines(keepends=True) if line.strip()
             for i in range(0, len(line), _MAX_LINE_CHARS)]
    if len(lines) > max_lines:
        lines = random.Random(seed).sample(lines, max_lines)
    return lines


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_dir: str,
                        seed: int = 0, max_lines: int = 300_000) -> SentencePieceTokenizer:
    """Train a lossless BPE model on `texts`; writes out_dir/tokenizer.model."""
    import sentencepiece as spm

    if vocab_size < 256 + 4:
        raise UserError(f"a sentencepiece vocabulary needs room for 256 byte pieces plus "
                        f"specials; got model.vocab_size={vocab_size} (use >= 260, or "
                        "data.tokenizer=byte)")
    lines = _training_lines(texts, max_lines, seed)
    if not lines:
        raise UserError("cannot train a tokenizer: the training split has no text lines")
    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, "tokenizer")
    prefix = f"{final}.training{os.getpid()}"     # renamed into place when complete
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, split_digits=True, character_coverage=0.9995,
            allow_whitespace_only_pieces=True, required_chars=_SPACE, unk_id=0, bos_id=1,
            eos_id=2, pad_id=3,
            max_sentence_length=_MAX_SENTENCE_BYTES, num_threads=os.cpu_count() or 1,
            minloglevel=2, hard_vocab_limit=False)
    except RuntimeError as exc:
        for ext in (".model", ".vocab"):
            if os.path.exists(prefix + ext):
                os.remove(prefix + ext)
        detail = " ".join(str(exc).split())
        raise UserError(f"cannot train a {vocab_size}-piece tokenizer on {len(lines)} lines "
                        f"({sum(map(len, lines))} characters) of the training split "
                        f"({detail}); add text, lower model.vocab_size or use "
                        "data.tokenizer=byte") from None
    if os.path.exists(prefix + ".vocab"):
        os.remove(prefix + ".vocab")
    os.replace(prefix + ".model", final + ".model")
    return SentencePieceTokenizer(final + ".model")


def vocab_note(tokenizer, vocab_size: int) -> Optional[str]:
    """One line when the tokenizer has fewer ids than model.vocab_size (for
    sentencepiece: a corpus too small or too narrow for it), else None: the ids it
    lacks are never sampled."""
    pieces = tokenizer.vocab_size
    if pieces >= vocab_size:
        return None
    why, more = "", ""
    if not isinstance(tokenizer, ByteTokenizer):
        why, more = " (the corpus is too small or too narrow for more)", ", or add text"
    return (f"note: the tokenizer has {pieces} ids, fewer than model.vocab_size="
            f"{vocab_size}{why}; ids {pieces}..{vocab_size - 1} are never sampled — set "
            f"model.vocab_size={pieces} for a smaller model{more}")


def load_or_train(kind: str, run_dir: str, vocab_size: int, train_texts, seed: int = 0):
    """The run's tokenizer: reuse the one saved in `run_dir`, else create it; a
    `vocab_note` goes to stderr before training."""
    tokenizer = _load_or_train(kind, run_dir, vocab_size, train_texts, seed)
    note = vocab_note(tokenizer, vocab_size)
    if note:
        print(note, file=sys.stderr)
    return tokenizer


def _load_or_train(kind: str, run_dir: str, vocab_size: int, train_texts, seed: int):
    spm_path = os.path.join(run_dir, SPM_FILE)
    byte_path = os.path.join(run_dir, BYTE_MARKER)
    if kind == "byte":
        if os.path.exists(spm_path):
            raise UserError(f"{run_dir} was created with a sentencepiece tokenizer; "
                            "use a new --run-dir for data.tokenizer=byte")
        os.makedirs(run_dir, exist_ok=True)
        atomic_write(byte_path, "utf-8 bytes\n")
        return ByteTokenizer()
    if os.path.exists(byte_path):
        raise UserError(f"{run_dir} was created with the byte tokenizer; "
                        "use a new --run-dir for data.tokenizer=sentencepiece")
    if os.path.exists(spm_path):
        return SentencePieceTokenizer(spm_path)
    return train_sentencepiece(train_texts(), vocab_size, run_dir, seed=seed)


def copy_tokenizer(src_run: str, dst_dir: str) -> None:
    """Give `dst_dir` (a later stage's run, or a model directory) the one tokenizer
    `load_tokenizer(src_run)` uses — sentencepiece first — unless it has one already
    (copied atomically). A source without a tokenizer is a one-line error."""
    load_tokenizer(src_run)
    for name in (SPM_FILE, BYTE_MARKER):
        if os.path.exists(os.path.join(dst_dir, name)):
            return
    for name in (SPM_FILE, BYTE_MARKER):
        src = os.path.join(src_run, name)
        if os.path.exists(src):
            os.makedirs(dst_dir, exist_ok=True)
            with open(src, "rb") as fh:
                atomic_write(os.path.join(dst_dir, name), fh.read())
            return


def load_tokenizer(run_dir: str):
    """The tokenizer a finished run saved (for export, inference, later stages)."""
    if os.path.exists(os.path.join(run_dir, SPM_FILE)):
        return SentencePieceTokenizer(os.path.join(run_dir, SPM_FILE))
    if os.path.exists(os.path.join(run_dir, BYTE_MARKER)):
        return ByteTokenizer()
    raise UserError(f"{run_dir} has no tokenizer ({SPM_FILE} or {BYTE_MARKER}); "
                    "is it a perspective-train run directory?")
