"""What a run fixes at its first start: data.path as the corpus, the token store
it trains on (a resume on other data is refused), the ternary schedule's length."""

import json

import pytest
from conftest import train_overrides

from perspective_jax.config import load_config
from perspective_jax.errors import UserError
from perspective_jax.train.metrics import read_metrics
from perspective_jax.train.trainer import prepare_data, train


def test_data_path_is_the_corpus_when_no_data_is_given(tmp_path, monkeypatch):
    text = "the quick brown fox jumps over the lazy dog. " * 40
    (tmp_path / "small.txt").write_text(text)
    monkeypatch.chdir(tmp_path)                       # relative: against the cwd
    cfg = load_config(None, train_overrides(**{"data.path": "small.txt"}))
    _, train_split, val_split = prepare_data(cfg, str(tmp_path / "run"), None)
    assert train_split.n_chars + val_split.n_chars == len(text)
    # byte tokenizer: one token per byte plus one EOS per split's document
    assert len(train_split.tokens) + len(val_split.tokens) == len(text.encode()) + 2
    cfg = load_config(None, train_overrides(**{"data.path": "missing.txt"}))
    with pytest.raises(UserError, match="data.path: no such file"):
        prepare_data(cfg, str(tmp_path / "run2"), None)


def test_resume_on_another_token_store_is_refused(tmp_path, text_corpus):
    other = tmp_path / "other.txt"
    other.write_text("".join(p.read_text() for p in sorted(text_corpus.iterdir()))[::-1])
    run_dir = str(tmp_path / "run")
    train(load_config(None, train_overrides(**{"train.steps": 2})), run_dir,
          data=[str(text_corpus)], progress=False)
    cfg = load_config(None, train_overrides(**{"train.steps": 3}))
    with pytest.raises(UserError) as err:
        train(cfg, run_dir, data=[str(other)], progress=False)
    msg = str(err.value)
    record = json.loads((tmp_path / "run" / "data.json").read_text())
    assert "\n" not in msg and record["token_store"] in msg and str(text_corpus) in msg
    assert str(other) in msg and "new --run-dir" in msg
    assert max(r["step"] for r in read_metrics(run_dir, "train")) == 2   # nothing trained
    # the original data still resumes
    assert train(cfg, run_dir, data=[str(text_corpus)], progress=False).step == 3


def test_raising_steps_of_a_ternary_run_keeps_its_schedule(tmp_path, text_corpus):
    """4 steps ternarise 0, .25, .5, .75 (equal phases of 4); resumed to 8 steps, the
    schedule stays pinned to 4, so steps 5..8 run fully ternary (not 0.5, 0.5, ...)."""
    routed = train_overrides(**{"model.routed": "true", "train.steps": 2})
    src = str(tmp_path / "sparse")
    train(load_config(None, routed), src, data=[str(text_corpus)], progress=False)
    ternary = lambda steps: load_config(None, train_overrides(**{
        "model.routed": "true", "ternary.enabled": "true", "train.steps": steps}))
    run_dir = str(tmp_path / "ternary")
    train(ternary(4), run_dir, data=[str(text_corpus)], init_from=src, progress=False)
    train(ternary(8), run_dir, data=[str(text_corpus)], init_from=src, progress=False)
    fractions = [r["ternary_fraction"] for r in read_metrics(run_dir, "train")]
    assert fractions == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    assert load_config(str(tmp_path / "ternary" / "config.yaml")).ternary.schedule_steps == 4
    bad = load_config(None, train_overrides(**{
        "model.routed": "true", "ternary.enabled": "true", "train.steps": 9,
        "ternary.schedule_steps": 9}))
    with pytest.raises(UserError, match="ternary.schedule_steps=4"):
        train(bad, run_dir, data=[str(text_corpus)], progress=False)


def test_a_damaged_data_record_is_a_one_line_error(tmp_path):
    import pytest
    from perspective_jax.errors import UserError
    from perspective_jax.rundir.layout import DATA_RECORD, load_data_record, save_data_record
    assert load_data_record(str(tmp_path)) is None
    save_data_record(str(tmp_path), {"token_store": "abc", "source": "x"})
    assert load_data_record(str(tmp_path))["token_store"] == "abc"
    (tmp_path / DATA_RECORD).write_text("{not json")
    with pytest.raises(UserError, match="damaged"):
        load_data_record(str(tmp_path))
