"""Publishing a model directory: --force replaces only an earlier export, the swap
never leaves neither, and stale staging directories are cleaned up."""

import json
import os
import subprocess
import sys

import jax
import pytest

from perspective_jax.errors import UserError
from perspective_jax.infer import model_dir as md
from perspective_jax.infer import publish
from perspective_jax.model.transformer import init_params
from streaming_helpers import export_model, routed_cfg


def _fake_export(path, tag="old"):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, md.MANIFEST), "w") as fh:
        json.dump({"format": md.FORMAT_NAME, "tag": tag}, fh)


def _staged(out, tag="new"):
    tmp = publish.staging_dir(out)
    _fake_export(tmp, tag)
    return tmp


def _tag(path):
    with open(os.path.join(path, md.MANIFEST)) as fh:
        return json.load(fh)["tag"]


def test_force_never_deletes_the_run_or_a_directory_that_is_not_an_export(tmp_path, small_cfg):
    cfg = routed_cfg(small_cfg)
    params = init_params(cfg.model, jax.random.key(0), moe=cfg.moe)
    run = tmp_path / "tok"                       # export_model's tokenizer (= run) directory
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    (run / "tokenizer.byte").write_text("utf-8 bytes\n")
    for out in (run, tmp_path):                  # the run itself, a directory containing it
        with pytest.raises(UserError, match="the run directory"):
            publish.check_destination(str(out), force=True, protected=[str(run)])
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(UserError, match="not a model directory"):
        export_model(tmp_path, cfg, params, name="notes", force=True)
    assert (notes / "todo.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        export_model(tmp_path, cfg, params, name="afile", force=True)
    path = export_model(tmp_path, cfg, params, name="model")
    with open(os.path.join(path, "stale.bin"), "w") as fh:
        fh.write("from the earlier export")
    export_model(tmp_path, cfg, params, name="model", force=True)   # an earlier export: replaced
    md.read_manifest(path)
    assert not os.path.exists(os.path.join(path, "stale.bin"))
    assert (run / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["afile", "model", "notes", "tok"]


def test_publish_swaps_in_the_new_export_and_removes_the_old_one(tmp_path):
    out = str(tmp_path / "m")
    _fake_export(out, "old")
    publish.publish(_staged(out), out, force=True)
    assert _tag(out) == "new" and os.listdir(tmp_path) == ["m"]


def test_a_failed_swap_puts_the_earlier_export_back(tmp_path, monkeypatch):
    out = str(tmp_path / "m")
    _fake_export(out, "old")
    tmp = _staged(out)
    rename = os.rename

    def failing(src, dst):
        if src == tmp:
            raise OSError("device gone")
        return rename(src, dst)
    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="device gone"):
        publish.publish(tmp, out, force=True)
    assert _tag(out) == "old"


def test_an_output_that_appears_during_the_export_is_not_replaced_without_force(tmp_path):
    out = str(tmp_path / "m")
    publish.check_destination(out, force=False)  # checked at the start: free
    tmp = _staged(out)
    os.makedirs(out)                             # then someone else creates it
    with open(os.path.join(out, "theirs.txt"), "w") as fh:
        fh.write("x")
    with pytest.raises(UserError, match="already exists"):
        publish.publish(tmp, out, force=False)
    with pytest.raises(UserError, match="not a model directory"):
        publish.publish(tmp, out, force=True)
    assert os.listdir(out) == ["theirs.txt"]


def test_staging_dirs_of_finished_processes_are_removed_and_live_ones_kept(tmp_path):
    out = str(tmp_path / "m")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    for name in (f"m.partial-{dead}", f"m.old-{dead}", "m.partial-1", "m.partial-x",
                 f"mm.partial-{dead}"):
        os.makedirs(tmp_path / name)
    tmp = publish.staging_dir(out)
    assert os.path.basename(tmp) == f"m.partial-{os.getpid()}"
    # pid 1 (init) is alive; "x" is no pid; "mm" is another output's
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["m.partial-1", "m.partial-x", f"mm.partial-{dead}", os.path.basename(tmp)])
