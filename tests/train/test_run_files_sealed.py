"""config.yaml and data.json of a run carry a checksum: a damaged or edited one is a
one-line error naming the file, never silently read."""

import pytest

from perspective_jax.config import PerspectiveConfig
from perspective_jax.errors import UserError
from perspective_jax.rundir.layout import (config_path, load_data_record, load_run_config,
                                           save_data_record, save_run_config)


def test_run_config_round_trips_and_refuses_an_edit(tmp_path):
    cfg = PerspectiveConfig()
    save_run_config(cfg, str(tmp_path))
    assert load_run_config(str(tmp_path)) == cfg
    path = config_path(str(tmp_path))
    text = open(path).read()
    assert "norm_eps" in text
    edited = text.replace("norm_eps: ", "norm_eps: 1", 1)     # one digit more
    open(path, "w").write(edited)
    with pytest.raises(UserError, match="config.yaml does not match its checksum"):
        load_run_config(str(tmp_path))


def test_run_config_without_a_checksum_still_reads(tmp_path):
    """Runs written before the checksum existed resume as before."""
    save_run_config(PerspectiveConfig(), str(tmp_path))
    path = config_path(str(tmp_path))
    lines = open(path).read().splitlines(keepends=True)
    open(path, "w").write("".join(lines[:-1]))
    assert load_run_config(str(tmp_path)) == PerspectiveConfig()


def test_data_record_is_sealed(tmp_path):
    save_data_record(str(tmp_path), {"token_store": "abc123", "source": "--data x"})
    assert load_data_record(str(tmp_path))["token_store"] == "abc123"
    path = tmp_path / "data.json"
    path.write_text(path.read_text().replace("abc123", "abc124"))
    with pytest.raises(UserError, match="data.json is damaged"):
        load_data_record(str(tmp_path))


def test_a_torn_metrics_log_is_read_without_its_damaged_lines(tmp_path, capsys):
    from perspective_jax.train.metrics import MetricsLogger, read_metrics
    log = MetricsLogger(str(tmp_path), tensorboard=False)
    for step in range(3):
        log.log(step, "train", {"loss": float(step)})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "kind": "tra')             # a writer killed mid-line
    assert [r["loss"] for r in read_metrics(str(tmp_path), "train")] == [0.0, 1.0, 2.0]
    assert "1 damaged line(s)" in capsys.readouterr().err


def test_a_run_refuses_a_tokenizer_other_than_the_one_it_started_with(tmp_path):
    """The data record keeps the tokenizer's sha256; a damaged or replaced tokenizer
    file is named before it is loaded (a damaged sentencepiece model once crashed the
    loader with a UnicodeDecodeError)."""
    from perspective_jax.train.resume import check_data_record, check_run_tokenizer
    tok = tmp_path / "tokenizer.model"
    tok.write_bytes(b"\x0a\x05hello" * 40)
    check_data_record(str(tmp_path), "abc", "--data x", resuming=False)
    check_run_tokenizer(str(tmp_path))                       # the same file: fine
    raw = bytearray(tok.read_bytes())
    raw[7] ^= 0x80
    tok.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="tokenizer.model is not the tokenizer this run "
                                        "started with"):
        check_run_tokenizer(str(tmp_path))


def test_a_damaged_sentencepiece_file_is_one_line(tmp_path):
    from perspective_jax.data.tokenizer import SentencePieceTokenizer
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\x0a\x03\xff\xfe\xfd" * 10)
    with pytest.raises(UserError, match="cannot load tokenizer .*damaged or not a tokenizer"):
        SentencePieceTokenizer(str(path))
