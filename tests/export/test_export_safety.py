"""Export safety: --force replaces only an earlier export, the swap never leaves
neither, stale staging directories are cleaned up; a curriculum root exports its
last *finished* stage; bad export arguments are one-line errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from perspective_jax.cli import export
from perspective_jax.errors import UserError
from perspective_jax.modeldir import format as md
from perspective_jax.modeldir.manifest import read_manifest
from perspective_jax.modeldir import publish
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
    read_manifest(path)
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


def _stage(root, name, steps, done):
    from perspective_jax.config import PerspectiveConfig, TrainConfig, save_config
    run = root / name
    (run / "checkpoints" / str(done)).mkdir(parents=True)
    (run / "checkpoints" / str(done) / "checksums.json").write_text("{}")   # listed: complete
    (run / "checkpoints" / f"{done + 5}.orbax-checkpoint-tmp-1").mkdir()   # being written
    save_config(PerspectiveConfig(train=TrainConfig(steps=steps, warmup_steps=0)),
                str(run / "config.yaml"))
    return str(run)


def test_a_curriculum_root_exports_its_last_finished_stage(tmp_path):
    from perspective_jax.export.exporter import resolve_run
    notes = []
    sparse = _stage(tmp_path, "sparse", steps=10, done=10)
    ternary = _stage(tmp_path, "ternary", steps=10, done=4)          # interrupted
    assert resolve_run(str(tmp_path), notes.append) == sparse
    assert "stage ternary is unfinished (checkpoint at step 4 of 10)" in notes[0]
    assert resolve_run(ternary, notes.append) == ternary              # asked for by name
    assert "exporting it as it is" in notes[1]
    with pytest.raises(UserError, match="no finished perspective-train run"):
        resolve_run(str(tmp_path / "sparse" / "checkpoints"), notes.append)


@pytest.mark.parametrize("flags, message", [
    (["--group-size", "0", "--shared-bits", "2"],
     "argument --group-size: must lie in [1, 2147483647], got 0"),
    (["--calibration-tokens", "-5"],
     "argument --calibration-tokens: must lie in [2, 16777216], got -5"),
    (["--shared-bits", "5"], "--shared-bits 5: use 0"),
    (["--delta-max-share", "1.5"], "argument --delta-max-share: must lie in [0, 1], got 1.5"),
    (["--embedding", "int4"], "--embedding: invalid choice: 'int4'"),
])
def test_bad_export_arguments_are_one_line_errors(tmp_path, capsys, flags, message):
    from perspective_jax.cli import export
    _stage(tmp_path, "align", steps=10, done=10)
    assert export.run(["--run-dir", str(tmp_path), "--out", str(tmp_path / "m")] + flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists()


def test_routing_frequencies_are_uniform_where_calibration_routed_nothing(small_cfg):
    from perspective_jax.export.exporter import routing_frequencies
    cfg = routed_cfg(small_cfg)
    params = init_params(cfg.model, jax.random.key(0), moe=cfg.moe)
    one = routing_frequencies(cfg, params, np.array([[5]], np.int32))   # no pair to route
    np.testing.assert_allclose(one, 1.0 / cfg.moe.num_experts)
    some = routing_frequencies(cfg, params, np.arange(40, dtype=np.int32)[None] % 259)
    np.testing.assert_allclose(some.sum(1), 1.0)
    assert (some.max(1) > 1.0 / cfg.moe.num_experts).all()


def _edited(path, edit):
    """Edit the manifest and seal it again: what an exporter with a bug would write."""
    manifest_path = os.path.join(path, md.MANIFEST)
    with open(manifest_path) as fh:
        manifest = json.load(fh)
    edit(manifest)
    with open(manifest_path, "w") as fh:
        json.dump(md.seal_manifest(manifest), fh)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(files={}), "shared weights file shared.safetensors is not listed"),
    (lambda m: m["experts"]["layers"].pop(), "expert layers indexed, the config has"),
    (lambda m: m["experts"]["layers"][0]["regions"].pop(), "must index experts 0.."),
    (lambda m: m["experts"]["layers"][1]["regions"][2].update(offset=10 ** 9),
     "expert layer 1, expert 2 lies outside"),
    (lambda m: m["experts"]["layers"][0]["deltas"][0].update(dst=99),
     "has a delta 0->99, not from an expert 0..8 to another 0..7"),
    (lambda m: m["experts"]["layers"][0]["hub"].update(offset=10 ** 9),
     "expert layer 0's hub lies outside"),
    (lambda m: m["experts"]["layers"][0].pop("hub"),
     "has a delta 8->0, not from an expert 0..7 to another 0..7"),
    (lambda m: m["experts"]["layers"][0]["deltas"][0].update(src=3, dst=4),
     "not lattice neighbours, nor from the layer's hub"),
    (lambda m: m["experts"]["layers"][0]["deltas"][0].update(count=10 ** 9), "lies outside"),
    (lambda m: m["experts"]["layers"][0]["deltas"][0].update(encoding="rle"),
     "has encoding 'rle', not one of positions, bitmap, fields"),
    (lambda m: m["experts"]["layers"][0]["deltas"][0].update(bytes=7),
     "says 7 bytes; its encoding and count make"),
    (lambda m: m["config"]["model"].update(d_ff=52), "region_bytes"),
    (lambda m: m["config"]["model"].update(d_ff=-1), "its config is invalid"),
    (lambda m: m["experts"].pop("layers"), "it is malformed"),
    (lambda m: m.update(tokenizer="bpe"), "tokenizer 'bpe'"),
    (lambda m: m.update(routing_frequencies=[[1.0]]), "routing_frequencies must be"),
    (lambda m: m.update(safety={"file": "polytope.spp"}),
     "the safety polytope file polytope.spp is not listed"),
    (lambda m: m.update(safety="polytope.spp"), "its safety entry must be an object"),
])
def test_a_manifest_inconsistent_with_its_config_or_files_is_refused(exported_writable, edit,
                                                                   message):
    _, _, path = exported_writable
    read_manifest(path)
    _edited(path, edit)
    with pytest.raises(md.ModelDirError, match=message.replace("(", r"\(")):
        read_manifest(path)


def test_a_manifest_that_is_not_an_object_is_refused(exported_writable):
    _, _, path = exported_writable
    with open(os.path.join(path, md.MANIFEST), "w") as fh:
        json.dump([1, 2], fh)
    with pytest.raises(md.ModelDirError, match="is not a manifest"):
        read_manifest(path)


def test_export_to_an_unwritable_place_fails_before_any_work(tmp_path, capsys):
    _stage(tmp_path, "align", steps=10, done=10)
    (tmp_path / "align" / "tokenizer.byte").write_text("utf-8 bytes\n")
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    # root may write anywhere it can create files: /proc refuses even root
    out = "/proc/no-model-here" if os.geteuid() == 0 else str(tmp_path / "ro" / "m")
    try:
        code = export.run(["--run-dir", str(tmp_path), "--out", out])
    finally:
        os.chmod(tmp_path / "ro", 0o755)
    assert code == 2
    out, err = capsys.readouterr()
    assert "cannot create" in err and err.startswith("error: ") and err.count("\n") == 1
