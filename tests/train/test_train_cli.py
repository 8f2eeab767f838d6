"""perspective-train: bad inputs give one-line errors and a non-zero exit."""

from conftest import train_overrides

from perspective_jax.cli.train import run


def args(run_dir, data, *extra):
    return ["--stage", "dense", "--run-dir", str(run_dir), "--no-progress",
            *[a for path in data or [] for a in ("--data", path)], *train_overrides(), *extra]


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    return err


def test_missing_data_path(tmp_path, capsys):
    assert run(args(tmp_path / "r", [str(tmp_path / "nope.txt")])) == 2
    assert "no such file" in one_line_error(capsys)


def test_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    assert run(args(tmp_path / "r", [str(tmp_path / "empty.txt")])) == 2
    assert "empty" in one_line_error(capsys)


def test_sequence_longer_than_corpus(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("only a few characters of text here")
    assert run(args(tmp_path / "r", [str(tmp_path / "short.txt")], "data.seq_len=512")) == 2
    assert "data.seq_len" in one_line_error(capsys)


def test_vocab_too_small_for_tokenizer(tmp_path, capsys, text_corpus):
    assert run(args(tmp_path / "r", [str(text_corpus)], "model.vocab_size=100")) == 2
    assert "model.vocab_size" in one_line_error(capsys)


def test_mesh_that_does_not_fit_the_devices(tmp_path, capsys, text_corpus):
    assert run(args(tmp_path / "r", [str(text_corpus)], "mesh.data=3")) == 2
    assert "mesh" in one_line_error(capsys)


def test_shape_changing_resume_is_refused(tmp_path, capsys, text_corpus):
    run_dir = tmp_path / "r"
    assert run(args(run_dir, [str(text_corpus)], "train.steps=3")) == 0
    capsys.readouterr()
    assert run(args(run_dir, [str(text_corpus)], "train.steps=6", "model.d_model=48")) == 2
    err = one_line_error(capsys)
    assert "model.d_model: 32 -> 48" in err and "new --run-dir" in err
    assert run(args(run_dir, [str(text_corpus)], "train.steps=6", "data.seq_len=16")) == 2
    assert "data.seq_len" in one_line_error(capsys)
    # the original config still resumes and extends the run
    assert run(args(run_dir, [str(text_corpus)], "train.steps=5")) == 0


def test_unknown_stage_is_rejected(tmp_path, capsys):
    assert run(["--stage", "bogus", "--run-dir", str(tmp_path)]) == 2
    assert "invalid choice: 'bogus'" in one_line_error(capsys)
