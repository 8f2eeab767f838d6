"""perspective-adapt and perspective-infer --adapter / --adapt-online on the small
exported model: the adapter written is the one whose held-out loss was reported
(recomputed from the file on a fresh engine); --adapter generates exactly what the
engine generates by hand with the adapter's extensions, and something else than the
plain model; --adapt-online creates, then changes, the adapter file and reports the
update; bad input is a one-line error, exit 2, that writes nothing."""

import contextlib
import io
import json
import os

import jax
import numpy as np
import pytest

from perspective_jax.adapt.adapter_file import AdapterSpec, load_adapters, save_adapters
from perspective_jax.adapt.attach import attach_adapter
from perspective_jax.adapt.target import StreamedTarget
from perspective_jax.cli import adapt, infer
from perspective_jax.errors import UserError
from perspective_jax.infer.engine import StreamingEngine, load_model_tokenizer
from perspective_jax.infer.options import EngineOptions
from perspective_jax.model.extensions import init_lora
from perspective_jax.model.mpd import OTHER_VIEWS

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind. " * 2
# every streamed update below runs on windows [1, 9] with K = 2 directions and rank
# 4, so the engine's tangent walk compiles its operations once for the whole file
SMALL = ["--seq-len", "8", "--examples", "1", "--heldout", "1", "--batch", "1",
         "--directions", "2", "--host-budget-mb", "1"]
PROMPT = "Now is the winter "                   # 18 bytes: two windows of 9 tokens


def _quiet(fn, argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = fn([str(a) for a in argv])
    return code, out.getvalue()


def _error(capsys, fn, *argv) -> str:
    capsys.readouterr()
    code = fn([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapt") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def adapted(exported, data, tmp_path_factory):
    """(model dir, adapter file, its JSON report, stdout) of a two-epoch run with NES."""
    _, _, model = exported
    d = tmp_path_factory.mktemp("adapted")
    out, report = str(d / "text.adapter"), str(d / "run.json")
    code, stdout = _quiet(adapt.run, ["--model-dir", model, "--data", data, "--out", out,
                                      "--epochs", "2", "--nes", "--nes-population", "2",
                                      "--json", report, *SMALL])
    assert code == 0
    with open(report) as fh:
        return model, out, json.load(fh), stdout


@pytest.fixture(scope="module")
def engine(exported):
    engine = StreamingEngine(exported[2], EngineOptions(host_budget_mb=1))
    yield engine
    engine.close()


@pytest.mark.slow           # the streamed tangent walk compiles op by op: minutes on CPU
def test_adapt_writes_the_adapter_whose_heldout_loss_it_reports(adapted, data, engine):
    model, out, report, stdout = adapted
    lines = stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["round 1/2", "round 2/2"]
    assert all("held-out loss" in line and "MPD agreement" in line for line in lines[:2])
    after = report["heldout_loss_after"]
    assert f"-> {after:.4f}" in lines[2] and lines[3] == f"wrote {out}"
    assert report["updates"] == 2 and report["mean_update_s"] > 0
    assert len(report["rounds"]) == 2 and report["windows"]["train"] == 1
    assert report["reduction"] == pytest.approx(report["heldout_loss_before"] - after)
    lora, spec, coords = load_adapters(out, engine.identity, engine.cfg)
    assert spec == AdapterSpec(rank=4) and sorted(coords)             # NES was on
    tok = load_model_tokenizer(model)
    _, held = adapt.draw_windows([tok.encode(TEXT)], 8, 1, 1, 0)
    target = StreamedTarget(engine)
    assert target.loss(held, lora, coords) == pytest.approx(after, rel=1e-6)
    assert target.loss(held, init_lora(engine.cfg.model, jax.random.key(0), 4), None) \
        == pytest.approx(report["heldout_loss_before"], rel=1e-6)


def test_windows_are_disjoint_seeded_and_short_texts_are_refused():
    ids = np.arange(100)
    train, held = adapt.draw_windows([ids], 9, 6, 3, seed=5)
    assert train.shape == (6, 10) and held.shape == (3, 10)
    starts = set(train[:, 0]) | set(held[:, 0])
    assert len(starts) == 9 and all(s % 10 == 0 for s in starts)    # whole windows, apart
    again = adapt.draw_windows([ids], 9, 6, 3, seed=5)
    assert all((a == b).all() for a, b in zip((train, held), again))
    assert not (adapt.draw_windows([ids], 9, 6, 3, seed=6)[1] == held).all()
    with pytest.raises(UserError, match="too short for one window"):
        adapt.draw_windows([ids, ids[:5]], 9, 1, 1, 0, names=["a", "b.txt"])
    with pytest.raises(UserError, match="need 11"):
        adapt.draw_windows([ids], 9, 10, 1, 0)


def _adapter_with_b(path, engine, b=0.5):
    lora = init_lora(engine.cfg.model, jax.random.key(3), 4, init_scale=0.5)
    lora = jax.tree_util.tree_map_with_path(
        lambda p, x: np.full_like(x, b) if jax.tree_util.keystr(p).endswith("['b']")
        else np.asarray(x), lora)
    save_adapters(str(path), lora, engine.identity, AdapterSpec(rank=4))
    return str(path)


def _greedy(engine, prompt_ids, n, ext=None) -> list:
    logits, state = engine.forward(np.asarray(prompt_ids), engine.new_state(), ext)
    ids = []
    for _ in range(n):
        ids.append(int(np.argmax(logits)))
        if ids[-1] == 258:                                      # the byte tokenizer's EOS
            break
        logits, state = engine.forward(np.asarray(ids[-1:]), state, ext)
    return ids


def test_infer_with_an_adapter_is_the_engine_with_its_extensions(exported, engine, tmp_path,
                                                                  capsys):
    model = exported[2]
    path = _adapter_with_b(tmp_path / "b.adapter", engine)
    tok = load_model_tokenizer(model)
    ids = tok.encode("abc")
    adapter = attach_adapter(engine, path)
    by_hand = _greedy(engine, ids, 8, adapter.extensions())
    plain = _greedy(engine, ids, 8)
    assert by_hand != plain
    outs = []
    for extra in (["--adapter", path], []):
        capsys.readouterr()
        assert infer.run(["--model-dir", model, "abc", "--max-tokens", "8", "--temperature",
                          "0", "--host-budget-mb", "1", *extra]) == 0
        outs.append(capsys.readouterr().out)
    assert outs == ["abc" + tok.decode(by_hand) + "\n", "abc" + tok.decode(plain) + "\n"]
    views = adapter.extensions(OTHER_VIEWS)                 # composes with MPD's views
    assert views.route == OTHER_VIEWS.route and views.adapters is adapter.lora


@pytest.mark.slow
def test_adapt_online_creates_then_updates_the_adapter(exported, engine, tmp_path, capsys):
    model = exported[2]
    path, state, stats = (str(tmp_path / n) for n in ("chat.adapter", "chat.state", "s.json"))
    common = ["--model-dir", model, "--max-tokens", "3", "--temperature", "0",
              "--host-budget-mb", "1", "--adapter", path, "--adapt-online",
              "--adapt-seq-len", "8", "--adapt-directions", "2", "--stats-json", stats]
    assert infer.run([*common, PROMPT, "--save-state", state]) == 0
    with open(stats) as fh:
        block = json.load(fh)["adaptation"]
    assert block["updates"] == 1 and block["windows"] == {"train": 1, "heldout": 1,
                                                          "tokens": 9}
    assert block["rolled_back"] is None and block["heldout_loss_after"] < \
        block["heldout_loss_before"] + 0.1
    lora, _, _ = load_adapters(path, engine.identity, engine.cfg)
    assert any(np.abs(b).max() > 0 for b in jax.tree.leaves(lora))   # B left 0
    first = open(path, "rb").read()
    assert infer.run([*common, " and yet!", "--resume-state", state]) == 0  # one window
    with open(stats) as fh:
        block = json.load(fh)["adaptation"]
    assert block["updates"] == 1 and "rails" in block and block["windows"]["heldout"] == 0
    assert open(path, "rb").read() != first
    capsys.readouterr()
    short = str(tmp_path / "short.adapter")
    assert infer.run([*common, "--adapter", short, "a"]) == 0        # the last --adapter
    assert "note: --adapt-online" in capsys.readouterr().err and not os.path.exists(short)


def test_bad_input_is_one_line(exported, data, engine, tmp_path, capsys):
    model = exported[2]
    out = _adapter_with_b(tmp_path / "b.adapter", engine)
    base = ["--model-dir", model, "--out", str(tmp_path / "x.adapter"), *SMALL]
    assert "no such file" in _error(capsys, adapt.run, *base, "--data", tmp_path / "none.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "is empty" in _error(capsys, adapt.run, *base, "--data", empty)
    assert "too short" in _error(capsys, adapt.run, *base, "--data", data, "--seq-len", "999")
    assert "--estimator" in _error(capsys, adapt.run, *base, "--data", data,
                                   "--estimator", "fancy")
    assert "--force" in _error(capsys, adapt.run, "--model-dir", model, "--data", data,
                               "--out", out, *SMALL[2:])
    assert not os.path.exists(tmp_path / "x.adapter")
    other = str(tmp_path / "other.adapter")
    save_adapters(other, init_lora(engine.cfg.model, jax.random.key(0), 2), "another model",
                  AdapterSpec(rank=2))
    run = ["--model-dir", model, "abc", "--max-tokens", "2"]
    assert "another model" in _error(capsys, infer.run, *run, "--adapter", other)
    assert "--adapter" in _error(capsys, infer.run, *run, "--adapt-online")
    assert "no such file" in _error(capsys, infer.run, *run, "--adapter", tmp_path / "n.a")
    damaged = tmp_path / "damaged.adapter"
    raw = bytearray(open(out, "rb").read())
    raw[-3] ^= 0x40
    damaged.write_bytes(bytes(raw))
    assert "damaged" in _error(capsys, infer.run, *run, "--adapter", damaged)
