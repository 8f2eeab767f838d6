"""Tokenise a corpus once into memory-mapped token files, cached by content hash.

Layout: RUN_DIR/data/<hash>/{train,val}.bin (uint16 or uint32 ids, documents
joined by EOS) and meta.json (token and character counts, the sha256 of each .bin,
itself sealed with a sha256). The hash covers the documents, the tokenizer and the
split, so any change re-tokenises. Every read verifies the files: the store is a
cache, so a damaged one is rebuilt from the corpus (`build_token_store`, with a note);
where there is no corpus to rebuild from (`latest_token_store`) it is an error.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sys
from typing import Optional

import numpy as np

from perspective_jax.data.corpus import Document, content_hash
from perspective_jax.errors import UserError
from perspective_jax.fileio import atomic_write, seal, seal_holds, sha256_file

_BATCH_DOCS = 256


@dataclasses.dataclass(frozen=True)
class TokenSplit:
    tokens: np.ndarray      # memory-mapped ids [n_tokens]
    n_chars: int            # characters of text behind them (for bits per char)
    store: str = ""         # the store's <hash>: documents, split and tokenizer

    @property
    def chars_per_token(self) -> float:
        return self.n_chars / max(len(self.tokens), 1)


def tokenizer_fingerprint(tokenizer) -> str:
    path = getattr(tokenizer, "path", None)
    if path is None:
        return type(tokenizer).__name__
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:16]


def _write_split(docs: list[Document], tokenizer, path: str) -> tuple[int, int]:
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.uint32
    n_tokens = n_chars = 0
    with open(path, "wb") as fh:
        for i in range(0, len(docs), _BATCH_DOCS):
            group = docs[i:i + _BATCH_DOCS]
            for doc, ids in zip(group, tokenizer.encode_batch([d.text for d in group])):
                ids = np.append(ids, tokenizer.eos_id).astype(dtype)
                fh.write(ids.tobytes())
                n_tokens += len(ids)
                n_chars += len(doc.text)
    return n_tokens, n_chars


def build_token_store(run_dir: str, train_docs: list[Document], val_docs: list[Document],
                      tokenizer) -> tuple[TokenSplit, TokenSplit]:
    key = content_hash(train_docs, "train") + content_hash(val_docs, "val")
    key = hashlib.sha256((key + tokenizer_fingerprint(tokenizer)).encode()).hexdigest()[:16]
    out = os.path.join(run_dir, "data", key)
    meta_path = os.path.join(out, "meta.json")
    dtype = "uint16" if tokenizer.vocab_size <= np.iinfo(np.uint16).max else "uint32"
    damage = _damage(out) if os.path.exists(meta_path) else None
    if damage is not None:
        print(f"note: token store {out} is damaged ({damage}); re-tokenising the corpus",
              file=sys.stderr)
        os.remove(meta_path)
    if not os.path.exists(meta_path):
        os.makedirs(out, exist_ok=True)
        meta = {"format": 2, "dtype": dtype}
        for name, docs in (("train", train_docs), ("val", val_docs)):
            path = os.path.join(out, f"{name}.bin")
            n_tok, n_chr = _write_split(docs, tokenizer, path)
            meta[name] = {"tokens": n_tok, "chars": n_chr, "documents": len(docs),
                          "sha256": sha256_file(path)}
        # meta.json last: a half-written store is never reused
        atomic_write(meta_path, json.dumps(seal(meta), indent=2))
    return _read_store(out, verified=True)


def _damage(out: str):
    """None if the store in `out` verifies (sealed meta.json, each file's size and
    sha256), else what is wrong."""
    try:
        with open(os.path.join(out, "meta.json"), encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return "meta.json unreadable"
    if not seal_holds(meta):
        return "meta.json fails its checksum"
    for name in ("train", "val"):
        path = os.path.join(out, f"{name}.bin")
        if not os.path.isfile(path):
            return f"{name}.bin missing"
        if os.path.getsize(path) != meta[name]["tokens"] * np.dtype(meta["dtype"]).itemsize:
            return f"{name}.bin has the wrong size"
        if sha256_file(path) != meta[name]["sha256"]:
            return f"{name}.bin fails its checksum"
    return None


def _read_store(out: str, verified: bool = False) -> tuple[TokenSplit, TokenSplit]:
    """The (train, val) splits of one complete store directory (memory-mapped),
    verified first unless the caller just did."""
    damage = None if verified else _damage(out)
    if damage is not None:
        raise UserError(f"token store {out} is damaged ({damage}); re-run perspective-train "
                        "with the run's data to rebuild it")
    with open(os.path.join(out, "meta.json")) as fh:
        meta = json.load(fh)
    splits = []
    for name in ("train", "val"):
        n = meta[name]["tokens"]
        tokens = np.memmap(os.path.join(out, f"{name}.bin"), dtype=meta["dtype"], mode="r",
                           shape=(n,)) if n else np.zeros((0,), meta["dtype"])
        splits.append(TokenSplit(tokens, meta[name]["chars"], os.path.basename(out)))
    return splits[0], splits[1]


def read_token_store(run_dir: str, key: str) -> Optional[tuple[TokenSplit, TokenSplit]]:
    """The (train, val) splits of the store RUN_DIR/data/<key> (verified), or None
    when the run has no complete store of that name."""
    out = os.path.join(run_dir, "data", key)
    return _read_store(out) if os.path.isfile(os.path.join(out, "meta.json")) else None


def latest_token_store(run_dir: str) -> Optional[tuple[TokenSplit, TokenSplit]]:
    """The (train, val) splits of the run's most recently written store, or None."""
    metas = sorted(glob.glob(os.path.join(run_dir, "data", "*", "meta.json")),
                   key=os.path.getmtime)
    return _read_store(os.path.dirname(metas[-1])) if metas else None


def check_long_enough(split: TokenSplit, name: str, seq_len: int) -> None:
    if len(split.tokens) < seq_len + 1:
        raise UserError(f"the {name} split has {len(split.tokens)} tokens, fewer than "
                        f"data.seq_len + 1 = {seq_len + 1}; use more text or a smaller "
                        "data.seq_len")
