"""Reading --data: binary files skipped with a note or refused, invalid UTF-8 named
with its count, UTF-16 with a byte-order mark decoded, text read as before."""

import pytest

from perspective_jax.config import load_config
from perspective_jax.data.corpus import expand_paths, read_documents
from perspective_jax.errors import UserError

TEXT = "héllo wörld\r\nsecond line\rthird\n"


def corpus(tmp_path):
    (tmp_path / "good.txt").write_bytes(TEXT.encode())
    (tmp_path / "latin1.txt").write_bytes("café olé naïve\n".encode("latin-1"))
    (tmp_path / "utf16.txt").write_bytes("wide ünïcode\n".encode("utf-16"))
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "noise.csv").write_bytes(bytes(range(128, 256)) * 4)
    return expand_paths([str(tmp_path)])


def test_binary_skipped_invalid_utf8_counted_utf16_decoded(tmp_path, capsys):
    docs = {d.name.rsplit("/", 1)[-1]: d.text for d in read_documents(corpus(tmp_path))}
    with open(tmp_path / "good.txt", encoding="utf-8") as fh:     # text mode: the reference
        assert docs["good.txt"] == fh.read()
    assert docs["utf16.txt"] == "wide ünïcode\n"
    assert docs["latin1.txt"] == "caf\ufffd ol\ufffd na\ufffdve\n"
    assert sorted(docs) == ["good.txt", "latin1.txt", "utf16.txt"]
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 2
    assert "skipped 2 binary file(s)" in notes[0] and "image.txt" in notes[0]
    assert "noise.csv" in notes[0] and "data.binary_files=refuse" in notes[0]
    assert f"{tmp_path / 'latin1.txt'} (3)" in notes[1] and "not valid UTF-8" in notes[1]


def test_binary_files_refused_by_config_and_all_binary_is_empty(tmp_path):
    from perspective_jax.train.trainer import prepare_data
    files = corpus(tmp_path)
    cfg = load_config(None, ["data.binary_files=refuse", "data.tokenizer=byte"])
    with pytest.raises(UserError, match="image.txt is not a text file") as err:
        prepare_data(cfg, str(tmp_path / "run"), [str(tmp_path)])
    assert "data.binary_files=skip" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"2 files, 2 skipped as binary"):
        read_documents([f for f in files if f.endswith(("image.txt", "noise.csv"))])
    with pytest.raises(UserError, match="data.binary_files"):
        load_config(None, ["data.binary_files=keep"])
