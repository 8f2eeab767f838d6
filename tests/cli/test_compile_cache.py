"""The CLIs' persistent compilation cache: where it goes, 'off', errors, trimming.
`jax.config.update` is recorded, not applied, so this run's own cache is untouched."""

import os

import jax
import pytest

from perspective_jax.cli import compile_cache
from perspective_jax.errors import UserError


@pytest.fixture
def updates(monkeypatch):
    calls = {}
    monkeypatch.setattr(jax.config, "update", lambda name, value: calls.__setitem__(name, value))
    for var in ("JAX_COMPILATION_CACHE_DIR", "PERSPECTIVE_JAX_CACHE_DIR",
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        monkeypatch.delenv(var, raising=False)
    return calls


def test_where_the_cache_goes(updates, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    want = str(tmp_path / "xdg" / "perspective-jax" / "xla")
    assert compile_cache.enable(None) is None and updates == {}     # CPU: off by default
    assert not os.path.exists(want)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert compile_cache.enable(None) == want and os.path.isdir(want)
    assert updates == {"jax_compilation_cache_dir": want,
                       "jax_persistent_cache_min_compile_time_secs": 0.0}
    monkeypatch.setenv("PERSPECTIVE_JAX_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache.enable(None) == str(tmp_path / "mine")
    assert compile_cache.enable(str(tmp_path / "flag")) == str(tmp_path / "flag")  # flag wins
    updates.clear()
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert compile_cache.enable(None) == str(tmp_path / "jax") and updates == {}  # JAX's own
    assert compile_cache.enable("off") is None
    assert updates == {"jax_enable_compilation_cache": False}


def test_an_unusable_directory(updates, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=r"--compilation-cache .*a-file/c: cannot use it"):
        compile_cache.enable(str(blocker / "c"))
    monkeypatch.setenv("PERSPECTIVE_JAX_CACHE_DIR", str(blocker / "c"))
    assert compile_cache.enable(None) is None             # the default: a note, no cache
    assert capsys.readouterr().err.startswith("note: no compilation cache")
    assert updates == {}


def test_trim_removes_the_least_recently_used_files_first(tmp_path):
    (tmp_path / "autotune").mkdir()                   # subdirectories count too
    for age, name in enumerate(["new", "autotune/mid", "old", "oldest", "read-lately"]):
        path = tmp_path / name
        path.write_bytes(b"x" * 100)
        t = 1_000_000 - age * 10
        os.utime(path, (t, t))
    os.utime(tmp_path / "read-lately", (2_000_000, 1_000_000 - 40))   # a recent cache hit
    assert compile_cache.trim(str(tmp_path), 250) == 300
    assert sorted(os.listdir(tmp_path)) == ["autotune", "new", "read-lately"]
    assert os.listdir(tmp_path / "autotune") == []
    assert compile_cache.trim(str(tmp_path), 1000) == 0
