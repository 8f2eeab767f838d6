"""What a training run directory holds, and its resolved config.

    RUN_DIR/
      config.yaml      the resolved config the stage trained with (CONFIG_FILE)
      checkpoints/     orbax checkpoints, one per saved step (`rundir.checkpoint`)
      tokenizer.*      the tokenizer in use; tokens/ the cached token files
      metrics.jsonl    train/eval records; tb/ TensorBoard events

A curriculum root (`perspective-train --stage all`) holds one such directory per
stage (`config.choices.CURRICULUM`).
"""

from __future__ import annotations

import os

from perspective_jax.config import PerspectiveConfig, load_config, save_config

CONFIG_FILE = "config.yaml"


def config_path(run_dir: str) -> str:
    return os.path.join(run_dir, CONFIG_FILE)


def has_config(run_dir: str) -> bool:
    return os.path.exists(config_path(run_dir))


def load_run_config(run_dir: str) -> PerspectiveConfig:
    """The resolved config a run trained with (raises ConfigError naming the file)."""
    return load_config(config_path(run_dir))


def save_run_config(cfg: PerspectiveConfig, run_dir: str) -> None:
    save_config(cfg, config_path(run_dir))
