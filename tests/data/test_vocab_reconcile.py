"""A tokenizer with fewer pieces than model.vocab_size (a numeric CSV corpus): training
evaluates, checkpoints and resumes, and perspective-infer --top-k 0 decodes; no id the
tokenizer lacks is ever chosen."""

import random

import pytest
from conftest import train_overrides

from perspective_jax.config import load_config
from perspective_jax.data.tokenizer import load_tokenizer
from perspective_jax.train.metrics import read_metrics
from perspective_jax.train.trainer import train

VOCAB = 512


def numeric_csv(path):
    rng = random.Random(0)
    rows = ["x,y,z"] + [",".join(str(rng.randint(0, 999)) for _ in range(3))
                        for _ in range(400)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_small_vocabulary_corpus_trains_resumes_and_infers(tmp_path, capsys):
    from perspective_jax.cli.infer import run as infer
    from perspective_jax.export.exporter import export_model
    corpus, run_dir = numeric_csv(tmp_path / "nums.csv"), str(tmp_path / "run")
    ov = train_overrides(**{"data.tokenizer": "sentencepiece", "model.vocab_size": VOCAB,
                            "model.n_layers": 2, "model.layer_pattern": "[pdr,gqa]",
                            "data.seq_len": 16, "train.steps": 2, "train.eval_every": 2,
                            "checkpoint.every": 2})
    first = train(load_config(None, ov), run_dir, data=[str(corpus)], progress=False)
    pieces = load_tokenizer(run_dir).vocab_size
    assert first.step == 2 and pieces < VOCAB and first.sample
    assert f"has {pieces} ids, fewer than model.vocab_size={VOCAB}" in capsys.readouterr().err
    resumed = train(load_config(None, ov + ["train.steps=3"]), run_dir, data=[str(corpus)],
                    progress=False)
    assert resumed.step == 3 and resumed.sample
    assert [r["step"] for r in read_metrics(run_dir, "eval")] == [2, 3]
    model_dir = str(tmp_path / "model")
    export_model(run_dir, model_dir, log=lambda *_: None)
    capsys.readouterr()
    assert infer(["--model-dir", model_dir, "--top-k", "0", "--temperature", "1.5",
                  "--max-tokens", "24", "1,2"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("1,2") and "error" not in out.err


def test_one_long_line_trains_and_a_foreign_id_is_a_one_line_error(tmp_path):
    """sentencepiece drops lines over 64 KiB (here: the whole corpus) and then failed;
    a corpus without spaces decoded a space as '\u2581'; decoding an id the tokenizer
    lacks raised IndexError."""
    from perspective_jax.data.tokenizer import train_sentencepiece
    from perspective_jax.errors import UserError
    text = ",".join(str(i % 997) for i in range(20000))              # ~77 kB, no newline
    tok = train_sentencepiece([text], vocab_size=300, out_dir=str(tmp_path))
    for sample in (text, " 1, 2  3 "):
        assert tok.decode(tok.encode(sample)) == sample
    with pytest.raises(UserError, match=f"token id {tok.vocab_size} is outside the "
                                        f"{tok.vocab_size} pieces") as err:
        tok.decode([5, tok.vocab_size])
    assert "\n" not in str(err.value)
