"""Shared fixtures: a small model config and the repository paths."""

import os
import pathlib

import pytest

from perspective_jax.config import ModelConfig

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture
def small_cfg() -> ModelConfig:
    """Two periods, window 8 so short sequences already exceed the window."""
    return ModelConfig(vocab_size=64, d_model=32, n_layers=8, d_ff=48, pdr_rank=8,
                       pdr_chunk=4, n_heads=4, n_kv_heads=2, head_dim=8, window=8)


@pytest.fixture
def repo() -> pathlib.Path:
    return REPO


@pytest.fixture
def shakespeare_path() -> pathlib.Path:
    if not SHARED_DATA.is_file():
        pytest.skip("shared TinyShakespeare corpus not present beside the repository")
    return SHARED_DATA
