"""Corpus ingest, tokenizers (lossless), token store cache, grain pipeline."""

import itertools
import json

import grain
import numpy as np
import pytest

from perspective_jax.data.byte_tokenizer import ByteTokenizer
from perspective_jax.data.corpus import (default_corpus_files, expand_paths, read_documents,
                                         split_documents)
from perspective_jax.data.pipeline import TrainBatches, WindowSource, eval_batches
from perspective_jax.data.token_store import build_token_store
from perspective_jax.data.tokenizer import load_tokenizer, train_sentencepiece
from perspective_jax.errors import UserError

TRICKY = ["héllo wörld — ünïcode", "中文字符和日本語のテキスト", "emoji 🚀🧪👩‍💻",
          "tabs\tand  double  spaces\n\n\nnewlines\r\nCRLF", "   leading and trailing   ",
          "\x00\x01 control \x7f chars", "math ∑∫√∞ ≤ ≥", ""]


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_is_lossless_on_arbitrary_unicode(tmp_path, text_corpus):
    texts = [p.read_text() for p in sorted(text_corpus.iterdir())]
    tok = train_sentencepiece(texts, vocab_size=400, out_dir=str(tmp_path))
    assert tok.vocab_size == 400
    for text in TRICKY + texts[:1]:
        assert tok.decode(tok.encode(text)) == text
    # reloaded from the run directory, it encodes identically
    again = load_tokenizer(str(tmp_path))
    assert np.array_equal(again.encode(texts[0]), tok.encode(texts[0]))
    # BPE compresses real text well below one token per byte
    assert len(tok.encode(texts[0])) < 0.6 * len(texts[0].encode())


def test_corpus_ingest_text_dirs_globs_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n\n"
                                      + json.dumps({"text": "delta"}) + "\n")
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    files = expand_paths([str(tmp_path)])
    assert sorted(d.text for d in read_documents(files)) == ["alpha", "beta", "delta", "gamma"]
    assert len(expand_paths([str(tmp_path / "*.txt")])) == 1


def test_default_corpus_is_the_standard_library():
    files = default_corpus_files()
    assert len(files) > 100 and all(f.endswith(".py") for f in files)
    assert not any("site-packages" in f for f in files)


@pytest.mark.parametrize("setup,needle", [
    (lambda p: [str(p / "missing")], "no such file"),
    (lambda p: (p / "e.txt").write_text("") and [str(p / "e.txt")] or [str(p / "e.txt")],
     "corpus is empty"),
    (lambda p: (p / "x.jsonl").write_text("{bad\n") and [str(p / "x.jsonl")], "invalid JSON"),
    (lambda p: (p / "y.jsonl").write_text('{"txt": 1}\n') and [str(p / "y.jsonl")],
     "'text' field"),
])
def test_bad_corpora_give_clear_errors(tmp_path, setup, needle):
    with pytest.raises(UserError, match=needle):
        read_documents(expand_paths(setup(tmp_path)))


def test_split_by_document_and_single_document_tail():
    from perspective_jax.data.corpus import Document
    many = [Document(f"d{i}", "x" * 100) for i in range(20)]
    train, val = split_documents(many, 0.1)
    assert len(val) == 2 and len(train) == 18
    assert not {d.name for d in train} & {d.name for d in val}
    one = [Document("only", "abcdefghij" * 10)]
    train, val = split_documents(one, 0.1)
    assert train[0].text + val[0].text == one[0].text and len(val[0].text) == 10


def test_token_store_is_cached_by_content(tmp_path):
    from perspective_jax.data.corpus import Document
    tok = ByteTokenizer()
    tr, va = [Document("a", "hello world")], [Document("b", "bye")]
    train, val = build_token_store(str(tmp_path), tr, va, tok)
    assert train.tokens.tolist() == list(b"hello world") + [tok.eos_id]
    assert val.n_chars == 3 and len(val.tokens) == 4
    build_token_store(str(tmp_path), tr, va, tok)
    assert len(list((tmp_path / "data").iterdir())) == 1          # reused
    build_token_store(str(tmp_path), [Document("a", "changed")], va, tok)
    assert len(list((tmp_path / "data").iterdir())) == 2          # new content, new store


def grain_reference(tokens, seq_len, batch_size, grad_accum, seed):
    """The one-process pipeline written directly in grain: shuffled windows, batched."""
    source = WindowSource(tokens, seq_len)
    ds = (grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat(None)
          .map(source.__getitem__).batch(batch_size))
    return (ds[b].reshape(grad_accum, batch_size // grad_accum, seq_len + 1)
            for b in itertools.count())


def test_train_batches_follow_the_grain_pipeline_and_start_anywhere():
    tokens = np.arange(300, dtype=np.uint16)
    it = TrainBatches(tokens, seq_len=8, batch_size=4, grad_accum=2, seed=3)
    ref = grain_reference(tokens, 8, 4, 2, 3)
    batches = [next(it) for _ in range(150)]                 # past two epochs
    for got, want in zip(batches, ref):
        np.testing.assert_array_equal(got, want)
    assert batches[0].shape == (2, 2, 9) and it.position == 150
    w = batches[0][0, 0]                                     # contiguous token slices
    assert np.array_equal(w, np.arange(w[0], w[0] + 9))
    resumed = TrainBatches(tokens, seq_len=8, batch_size=4, grad_accum=2, seed=3, start=97)
    np.testing.assert_array_equal(next(resumed), batches[97])


def test_processes_feed_their_rows_of_the_same_global_batch():
    tokens = np.arange(500, dtype=np.uint16)
    whole = TrainBatches(tokens, 4, batch_size=16, grad_accum=2, seed=0)
    parts = [TrainBatches(tokens, 4, batch_size=16, grad_accum=2, seed=0, rows=rows)
             for rows in ((0, 2), (2, 4), (4, 8))]
    for _ in range(5):
        np.testing.assert_array_equal(np.concatenate([next(p) for p in parts], axis=1),
                                      next(whole))


def test_pipeline_errors_and_eval_windows():
    with pytest.raises(UserError, match="data.seq_len"):
        TrainBatches(np.arange(5), seq_len=8, batch_size=2, grad_accum=1, seed=0)
    with pytest.raises(UserError, match="grad_accum"):
        TrainBatches(np.arange(100), seq_len=8, batch_size=6, grad_accum=4, seed=0)
    batches = eval_batches(np.arange(100), seq_len=8, batch_size=2, n_batches=3)
    assert len(batches) == 3 and batches[0].shape == (2, 9)
