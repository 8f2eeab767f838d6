"""The `safety` stage (SPEC §3.9): windows, states, the polytope it writes, its inputs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perspective_jax.cli.train import run
from perspective_jax.config import load_config
from perspective_jax.data.byte_tokenizer import ByteTokenizer
from perspective_jax.data.token_store import read_token_store
from perspective_jax.errors import UserError
from perspective_jax.model.transformer import PerspectiveLM, abstract_params
from perspective_jax.rundir.checkpoint import restore_params
from perspective_jax.rundir.layout import load_data_record, save_run_config
from perspective_jax.safety.polytope_file import read_polytope
from perspective_jax.train import safety_stage as ss
from perspective_jax.train.objective import effective_params
from safety_helpers import FAST


def one_line_error(capsys, *args) -> str:
    assert run(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_windows_with_a_flagged_string_are_dropped_however_it_is_split():
    """choose_windows against a byte-by-byte reference: every window whose bytes (and
    the byte after it, which its last state predicts) contain a flagged string is
    dropped and counted; every other window is kept."""
    t = 16
    text = (b"x" * 7 + b"os.system" + b"(" + b"y" * 15        # split over two windows
            + b"safe text here. " * 8 + b"-os.system(x) " + b"more safe text. " * 8)
    seg = np.frombuffer(text, np.uint8).astype(np.int32)
    appended = ByteTokenizer().appended_bytes()
    windows, counts = ss.choose_windows([seg, seg[:40]], t, appended, (b"os.system(",),
                                        wanted=10**6, seed=3)
    starts = [(s, seg) for s in range(0, len(seg) - t + 1, t)] + [(0, seg[:40]), (16, seg[:40])]
    dirty = [bytes(x[s:s + t + 1].astype(np.uint8)) for s, x in starts]
    want_kept = sorted(bytes(x[s:s + t].astype(np.uint8)) for (s, x), d in zip(starts, dirty)
                       if b"os.system(" not in d)
    assert counts["windows_total"] == len(starts) == counts["windows_examined"]
    assert counts["windows_dropped_flagged"] == len(starts) - len(want_kept) >= 3
    assert sorted(bytes(w.astype(np.uint8)) for w in windows) == want_kept
    # the window before "(" is dropped: its last state predicts the token that finishes it
    assert b"x" * 7 + b"os.system" not in want_kept and b"(" + b"y" * 15 in want_kept


def test_too_few_safe_windows_is_one_line():
    seg = np.frombuffer(b"eval(" * 20, np.uint8).astype(np.int32)
    with pytest.raises(UserError, match="at least 2 are needed"):
        ss.choose_windows([seg], 8, ByteTokenizer().appended_bytes(), (b"eval(",), 10, 0)


def test_states_are_what_the_head_sees(tiny_align_run):
    """collect_states x: x·Eᵀ equals the plain model's logits (second implementation)."""
    cfg = load_config(os.path.join(tiny_align_run, "config.yaml"))
    params = effective_params(cfg, restore_params(tiny_align_run, abstract_params(
        cfg.model, cfg.moe)), cfg.train.steps)
    tokens = np.arange(11 * 32, dtype=np.int32).reshape(11, 32) % 200
    x = ss.collect_states(cfg, params, tokens, batch=8)                 # one padded batch
    logits, _ = jax.jit(PerspectiveLM(cfg.model, cfg.moe).apply)({"params": params},
                                                                jnp.asarray(tokens[:8]))
    x = x[:8]
    table = np.asarray(params["embed"]["embedding"], np.float64)
    np.testing.assert_allclose(x @ table.T, np.asarray(logits), rtol=1e-4, atol=1e-4)


def test_held_out_states_come_from_whole_windows():
    states = np.arange(10 * 6 * 2, dtype=np.float32).reshape(10, 6, 2)
    cfg = load_config(None, ["safety.heldout_fraction=0.3", "safety.max_states=30"])
    fit, held = ss.split_states(states, cfg.safety)
    assert len(fit) + len(held) == 30 and len(held) == 3 * 3      # 3 windows × 3 positions
    windows = lambda a: set((a[:, 0] // 12).astype(int).tolist())  # noqa: E731
    assert windows(held) == {0, 1, 2} and not windows(held) & windows(fit)


def cfg_d_model(run_dir) -> int:
    return load_config(os.path.join(run_dir, "config.yaml")).model.d_model


def test_the_stage_writes_a_polytope_that_holds_the_safe_text(safety_run, tiny_align_run):
    report = json.load(open(os.path.join(safety_run, ss.REPORT_FILE)))
    poly = read_polytope(os.path.join(safety_run, "polytope.spp"))
    assert report["flagged"] == ["import", "def "] and list(poly.flagged) == report["flagged"]
    assert report["windows"]["windows_dropped_flagged"] > 0
    assert report["source_run"] == os.path.abspath(tiny_align_run)
    assert poly.d_model == cfg_d_model(tiny_align_run)
    assert report["fit_states"] + report["heldout_states"] <= 1024
    # the tokens that can finish a flagged string are capped (byte tokenizer: the last byte)
    assert set(poly.flag_tokens.tolist()) == {ord("t"), ord(" ")}
    cfg = load_config(os.path.join(safety_run, "config.yaml"))
    assert cfg.safety.flagged == ("import", "def ") and cfg.model.routed
    normals, bounds = poly.support_rows()

    def inside(x):
        return np.mean((x.astype(np.float64) @ normals.T - bounds).max(1) <= 1e-5)

    # the stage's own held-out states (the same seeded windows and split) ...
    params = effective_params(cfg, restore_params(tiny_align_run, abstract_params(
        cfg.model, cfg.moe)), cfg.train.steps)
    record = load_data_record(tiny_align_run)
    segs = [np.asarray(s.tokens) for s in read_token_store(tiny_align_run,
                                                           record["token_store"])]
    appended = ByteTokenizer().appended_bytes()
    strings = (b"import", b"def ")
    windows, _ = ss.choose_windows(segs, 32, appended, strings, 32, cfg.safety.seed)
    fit, held = ss.split_states(ss.collect_states(cfg, params, windows, 8), cfg.safety)
    assert (len(fit), len(held)) == (report["fit_states"], report["heldout_states"])
    assert inside(held) >= 1 - cfg.safety.fp_target - 1.0 / len(held)
    # ... and safe windows the stage never looked at
    fresh, _ = ss.choose_windows(segs, 32, appended, strings, 200, seed=99)
    seen = {w.tobytes() for w in windows}
    fresh = np.stack([w for w in fresh if w.tobytes() not in seen])
    assert inside(ss.collect_states(cfg, params, fresh, 8).reshape(-1, 32)) >= 0.85


def test_rerunning_a_finished_stage_is_a_no_op_and_other_settings_are_refused(
        safety_run, tiny_align_run, capsys):
    before = {n: os.path.getmtime(os.path.join(safety_run, n)) for n in os.listdir(safety_run)}
    assert run(["--stage", "safety", "--init-from", tiny_align_run, "--run-dir", safety_run,
                "--flagged", "import", "--flagged", "def ", *FAST]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {n: os.path.getmtime(os.path.join(safety_run, n))
            for n in os.listdir(safety_run)} == before
    err = one_line_error(capsys, "--stage", "safety", "--run-dir", safety_run,
                         "--flagged", "import", *FAST)
    assert "other settings" in err


def test_flagged_file_and_safe_data(tiny_align_run, tmp_path, capsys):
    flagged = tmp_path / "flagged.txt"
    flagged.write_text("# comment\n\nreturn\n  \nraise\n")
    assert ss.read_flagged_file(str(flagged)) == ("return", "raise")
    safe = tmp_path / "safe"
    safe.mkdir()
    (safe / "a.txt").write_text("x = 1 + 2 # a sum\n" * 40 + "return y\n" * 3)
    out = tmp_path / "out"
    assert run(["--stage", "safety", "--init-from", tiny_align_run, "--run-dir", str(out),
                "--flagged-file", str(flagged), "--flagged", "raise", "--safe-data",
                str(safe), *FAST]) == 0
    report = json.load(open(out / ss.REPORT_FILE))
    assert report["flagged"] == ["raise", "return"] and report["safe_data"].endswith("safe")
    # 747 bytes + EOS: 23 windows of 32 tokens, those that contain "return" dropped
    assert report["windows"]["windows_total"] == 23
    assert report["windows"]["windows_dropped_flagged"] >= 1


@pytest.mark.parametrize("extra, message", [
    ((), "needs flagged strings"),
    (("--flagged", "x", "--safe-data", "/nonexistent/safe"), "--safe-data: no such file"),
    (("--flagged", "x", "--data", "/tmp"), "not --data"),
    (("--flagged", "x", "--resume-from-step", "1"), "--resume-from-step cannot"),
    (("--flagged-file", "/nonexistent/flagged.txt"), "--flagged-file /nonexistent"),
])
def test_bad_safety_inputs_are_one_line(tiny_align_run, tmp_path, capsys, extra, message):
    err = one_line_error(capsys, "--stage", "safety", "--init-from", tiny_align_run,
                         "--run-dir", str(tmp_path / "out"), *extra)
    assert message in err


def test_the_source_must_be_an_align_or_ternary_run(tiny_align_run, tmp_path, capsys):
    cfg = load_config(os.path.join(tiny_align_run, "config.yaml"))
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    from perspective_jax.train.stages import stage_config
    save_run_config(stage_config(cfg, "sparse"), str(sparse))
    err = one_line_error(capsys, "--stage", "safety", "--init-from", str(sparse),
                         "--run-dir", str(tmp_path / "out"), "--flagged", "x")
    assert "align (or ternary) run" in err and "upcycle or sparse" in err
    err = one_line_error(capsys, "--stage", "safety", "--run-dir", str(tmp_path / "o2"),
                         "--flagged", "x")
    assert "needs --init-from" in err
    err = one_line_error(capsys, "--stage", "dense", "--run-dir", str(tmp_path / "o3"),
                         "--flagged", "x")
    assert "only for --stage safety" in err
    # a source without a token store needs --safe-data
    bare = tmp_path / "bare"
    import shutil
    shutil.copytree(tiny_align_run, bare, ignore=shutil.ignore_patterns("data", ".lock"))
    err = one_line_error(capsys, "--stage", "safety", "--init-from", str(bare),
                         "--run-dir", str(tmp_path / "o4"), "--flagged", "x", *FAST)
    assert "pass --safe-data" in err


def test_a_safety_run_is_not_a_source(safety_run, tmp_path, capsys):
    err = one_line_error(capsys, "--stage", "safety", "--init-from", safety_run,
                         "--run-dir", str(tmp_path / "out"), "--flagged", "x")
    assert "is a safety run" in err
