"""An export checks free space against its size up front, and a full disk anywhere
during it (ENOSPC, injected at the write) is one line naming the file and the bytes
needed; what it leaves behind is nothing, and a partial directory (what a kill at
that moment leaves) is refused by read_manifest."""

import builtins
import errno
import os
import shutil

import jax
import pytest
from safetensors import safe_open

from perspective_jax.cli import export
from perspective_jax.errors import UserError
from perspective_jax.export import exporter as ex
from perspective_jax.export import space
from perspective_jax.fileio import human_bytes
from perspective_jax.model.transformer import init_params
from perspective_jax.modeldir import format as md
from perspective_jax.modeldir.manifest import read_manifest
from streaming_helpers import export_model, routed_cfg, similar_experts


def _written_bytes(path):
    """What an export wrote at least (`space.expected_bytes`' reference): the expert
    files and the tensor data of shared.safetensors (its size less its header)."""
    experts = sum(os.path.getsize(os.path.join(path, "experts", n))
                  for n in os.listdir(os.path.join(path, "experts")))
    shared = os.path.join(path, md.SHARED_FILE)
    with safe_open(shared, "np") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    data = sum(t.nbytes for t in tensors.values())
    with open(shared, "rb") as fh:
        header = 8 + int.from_bytes(fh.read(8), "little")
    assert os.path.getsize(shared) == header + data
    return experts + data


def test_expected_size_is_what_an_export_writes(exported):
    cfg, params, path = exported
    assert space.expected_bytes(cfg, params) == _written_bytes(path)


class _FullDisk:
    """A file that takes `room` bytes, then fails with ENOSPC (after `at_full()`)."""

    def __init__(self, fh, room, at_full):
        self.fh, self.room, self.at_full = fh, room, at_full

    def write(self, data):
        if len(data) > self.room:
            self.fh.write(data[: self.room])
            self.fh.flush()
            self.room = 0
            self.at_full()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.fh.write(data)

    def close(self):
        self.fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _disk_fills_at(monkeypatch, staging, target, snapshot):
    """Writes of staging/target fail with ENOSPC after 5 bytes; at that moment the
    staging directory is copied to `snapshot` (what a kill -9 would leave)."""
    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kw):
        fh = real_open(file, mode, *args, **kw)
        if (isinstance(file, str) and "w" in mode   # the file, or its atomic temp file
                and file.startswith(os.path.join(staging, target))):
            return _FullDisk(fh, 5, lambda: shutil.copytree(staging, snapshot))
        return fh
    monkeypatch.setattr(builtins, "open", fake_open)


@pytest.mark.parametrize("target", [md.expert_file(1), md.delta_file(0), md.SHARED_FILE,
                                    "tokenizer.byte", md.MANIFEST])
def test_a_full_disk_anywhere_is_one_line_and_leaves_nothing(tmp_path, small_cfg,
                                                            monkeypatch, target):
    cfg = routed_cfg(small_cfg)
    params = init_params(cfg.model, jax.random.key(0), moe=cfg.moe)
    params = similar_experts(params, cfg, jax.random.key(1))   # deltas are kept
    out = str(tmp_path / "model")
    _disk_fills_at(monkeypatch, f"{out}.partial-{os.getpid()}", target, tmp_path / "snap")
    with pytest.raises(UserError) as err:
        export_model(tmp_path, cfg, params)
    monkeypatch.undo()
    named = os.path.join(out, target)
    needed = human_bytes(space.expected_bytes(cfg, params))
    assert str(err.value).startswith(f"no space left on the device writing {named} "
                                     f"(needs {needed}, ") and "\n" not in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["snap", "tok"]      # no model, no staging
    with pytest.raises(md.ModelDirError, match="no manifest.json|not valid JSON"):
        read_manifest(str(tmp_path / "snap"))


def _run_dir(root, cfg):
    """A run directory export_model resolves (its checkpoint restored by a stub)."""
    import dataclasses
    from perspective_jax.config import TrainConfig, save_config
    run = root / "run"
    (run / "checkpoints" / "10").mkdir(parents=True)
    (run / "tokenizer.byte").write_text("utf-8 bytes\n")
    save_config(dataclasses.replace(cfg, train=TrainConfig(steps=10, warmup_steps=0)),
                str(run / "config.yaml"))
    return str(run)


def test_export_refuses_too_little_space_up_front_with_the_numbers(tmp_path, small_cfg,
                                                                   monkeypatch, capsys):
    cfg = routed_cfg(small_cfg)
    params = init_params(cfg.model, jax.random.key(0), moe=cfg.moe)
    run, out = _run_dir(tmp_path, cfg), str(tmp_path / "m")
    restored = []
    monkeypatch.setattr(ex, "restore_params", lambda *a, **k: restored.append(1) or params)
    monkeypatch.setattr(space, "free_bytes", lambda path: 1000)
    assert export.run(["--run-dir", run, "--out", out, "--embedding", "int8"]) == 2
    err = capsys.readouterr().err
    needed = space.expected_bytes(cfg, params, embedding="int8")
    assert err == (f"error: --out {out}: the export needs at least {human_bytes(needed)}, its "
                   "filesystem has 1000 B free; free some space, choose another --out, or "
                   "pass --skip-space-check to try anyway\n")
    assert not restored and not os.path.exists(out)            # refused before any work
    assert export.run(["--run-dir", run, "--out", out, "--embedding", "int8",
                       "--skip-space-check"]) == 0
    assert needed == _written_bytes(out)                       # the estimate, measured
    read_manifest(out)
    _disk_fills_at(monkeypatch, f"{out}2.partial-{os.getpid()}", md.expert_file(0),
                   tmp_path / "snap")
    capsys.readouterr()
    assert export.run(["--run-dir", run, "--out", out + "2", "--skip-space-check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no space left on the device writing "
                          f"{os.path.join(out + '2', md.expert_file(0))} (needs ")
    assert err.count("\n") == 1 and "Traceback" not in err
