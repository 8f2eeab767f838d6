"""Shared fixtures: a small model config, a small real corpus, repository paths.

XLA is asked for 8 host devices (before jax is imported) so sharding tests can
build real meshes on CPU; unsharded code still runs on device 0. Compiled programs
are shared through a per-run persistent compilation cache (`_share_compilations`).
"""

import os
import pathlib

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _share_compilations() -> None:
    """One persistent XLA compilation cache for the whole run — the pytest process, its
    xdist workers and the CLI subprocesses tests start all inherit it from the
    environment — so a program compiled by one test (a train step of the tiny config,
    say) is loaded, not recompiled, by the next. Fresh per run unless the caller set
    JAX_COMPILATION_CACHE_DIR; removed at exit by the process that made it."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    import atexit
    import shutil
    import tempfile
    path = tempfile.mkdtemp(prefix="perspective-jax-test-xla-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


_share_compilations()

import inspect  # noqa: E402

import pytest

from perspective_jax.config import ModelConfig

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def _small_cfg() -> ModelConfig:
    """Two periods, window 8 so short sequences already exceed the window."""
    return ModelConfig(vocab_size=64, d_model=32, n_layers=8, d_ff=48, pdr_rank=8,
                       pdr_chunk=4, n_heads=4, n_kv_heads=2, head_dim=8, window=8)


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """After each test module, drop JAX's in-memory compiled programs. Every XLA CPU
    executable keeps memory mappings of its own until it is freed, and a worker that
    runs a few hundred tests kept them all: its mappings reached Linux's
    vm.max_map_count (65,530) and XLA crashed (segfault or abort) compiling or
    serialising the next program, late in the suite. Programs a later module needs
    again come back from the persistent cache."""
    yield
    import gc

    import jax
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def small_cfg() -> ModelConfig:
    return _small_cfg()


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(config, params, model dir) of a small exported routed model (streaming tests),
    exported once per session. Its files are read-only: a test that damages a model
    directory takes `exported_writable` (a private copy) instead."""
    from streaming_helpers import exported_model
    cfg, params, path = exported_model(tmp_path_factory.mktemp("exported"), _small_cfg())
    for root, _, files in os.walk(path):
        for name in files:
            os.chmod(os.path.join(root, name), 0o444)
    return cfg, params, path


@pytest.fixture(scope="session")
def exported_distinct(tmp_path_factory):
    """(config, params, model dir) of a small exported routed model whose experts
    differ, so MPD's views disagree (MPD and perspective-eval tests)."""
    from streaming_helpers import distinct_model
    return distinct_model(tmp_path_factory.mktemp("distinct"), _small_cfg())


@pytest.fixture(scope="module")
def served(exported):
    """(running perspective-serve app on 127.0.0.1, model dir) on `exported`, shared
    by a test module: batch 16, queue 64, no key (serve_helpers.py)."""
    from serve_helpers import running
    _, _, path = exported
    with running(path) as server:
        yield server, path


@pytest.fixture
def exported_writable(exported, tmp_path):
    """`exported` with the model directory copied to a writable place of its own."""
    import shutil
    cfg, params, path = exported
    copy = str(tmp_path / "model")
    shutil.copytree(path, copy, copy_function=shutil.copyfile)
    return cfg, params, copy


@pytest.fixture
def repo() -> pathlib.Path:
    return REPO


@pytest.fixture
def shakespeare_path() -> pathlib.Path:
    if not SHARED_DATA.is_file():
        pytest.skip("shared TinyShakespeare corpus not present beside the repository")
    return SHARED_DATA


@pytest.fixture
def text_corpus(tmp_path) -> pathlib.Path:
    """A directory of real text: a few modules of Python's own standard library."""
    import argparse
    import difflib
    import textwrap
    out = tmp_path / "corpus"
    out.mkdir()
    for mod in (argparse, difflib, textwrap):
        src = inspect.getsourcefile(mod)
        (out / (mod.__name__ + ".py")).write_text(pathlib.Path(src).read_text())
    return out


def train_overrides(**extra) -> list[str]:
    """A very small dense run: byte tokenizer, 2 layers of width 32."""
    base = {"model.vocab_size": 259, "model.d_model": 32, "model.n_layers": 4,
            "model.d_ff": 64, "model.pdr_rank": 8, "model.n_heads": 2, "model.n_kv_heads": 2,
            "model.head_dim": 16, "model.window": 16, "data.tokenizer": "byte",
            "data.seq_len": 32, "train.batch_size": 8, "train.steps": 6,
            "train.warmup_steps": 2, "train.eval_every": 1000, "train.eval_batches": 1,
            "train.log_every": 1, "checkpoint.every": 3, "checkpoint.keep": 10}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def tiny_align_run(tmp_path_factory) -> str:
    """A tiny align-stage run directory (random weights; safety_helpers.tiny_run), shared
    read-only by the safety-stage and export tests."""
    from safety_helpers import tiny_run
    return tiny_run(tmp_path_factory.mktemp("safety-src") / "align", _small_cfg())


@pytest.fixture(scope="session")
def safety_run(tiny_align_run, tmp_path_factory) -> str:
    """The safety stage of `tiny_align_run` ("import" and "def " flagged, few states)."""
    from perspective_jax.cli.train import run
    from safety_helpers import FAST
    out = str(tmp_path_factory.mktemp("safety-out") / "safety")
    assert run(["--stage", "safety", "--init-from", tiny_align_run, "--run-dir", out,
                "--flagged", "import", "--flagged", "def ", *FAST]) == 0
    return out
