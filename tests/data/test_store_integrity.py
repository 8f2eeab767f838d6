"""The token store verifies its files on every read: a damaged cache is rebuilt from
the corpus (same tokens), and where there is no corpus it is a one-line error."""

import json
import os

import numpy as np
import pytest

from perspective_jax.data.byte_tokenizer import ByteTokenizer
from perspective_jax.data.corpus import Document
from perspective_jax.data.token_store import build_token_store, latest_token_store
from perspective_jax.errors import UserError

DOCS = [Document(f"d{i}", f"document {i}: " + "words and more words " * (i + 3))
        for i in range(6)]


def _store(tmp_path):
    train, val = build_token_store(str(tmp_path), DOCS[:4], DOCS[4:], ByteTokenizer())
    return os.path.join(str(tmp_path), "data", train.store), np.array(train.tokens)


def _flip(path, offset):
    raw = bytearray(open(path, "rb").read())
    raw[offset % len(raw)] ^= 0x20
    open(path, "wb").write(bytes(raw))


@pytest.mark.parametrize("name", ["train.bin", "val.bin", "meta.json"])
def test_a_damaged_store_is_rebuilt_identically(tmp_path, capsys, name):
    out, reference = _store(tmp_path)
    _flip(os.path.join(out, name), 17)
    train, _ = build_token_store(str(tmp_path), DOCS[:4], DOCS[4:], ByteTokenizer())
    assert "damaged" in capsys.readouterr().err
    assert np.array_equal(np.array(train.tokens), reference)   # the same tokens as before


def test_a_damaged_store_without_its_corpus_is_an_error(tmp_path):
    out, _ = _store(tmp_path)
    _flip(os.path.join(out, "train.bin"), 5)
    with pytest.raises(UserError, match="train.bin fails its checksum"):
        latest_token_store(str(tmp_path))


def test_an_edited_token_count_is_caught(tmp_path):
    out, _ = _store(tmp_path)
    meta = json.load(open(os.path.join(out, "meta.json")))
    meta["train"]["tokens"] -= 1
    json.dump(meta, open(os.path.join(out, "meta.json"), "w"))
    with pytest.raises(UserError, match="meta.json fails its checksum"):
        latest_token_store(str(tmp_path))
