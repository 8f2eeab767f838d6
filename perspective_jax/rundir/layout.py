"""What a training run directory holds, and its resolved config.

    RUN_DIR/
      config.yaml      the resolved config the stage trained with (CONFIG_FILE)
      checkpoints/     orbax checkpoints, one per saved step (`rundir.checkpoint`)
      tokenizer.*      the tokenizer in use; data/<hash>/ the cached token files
      data.json        the token store the run started on (DATA_RECORD): resumes
                       must use the same one
      metrics.jsonl    train/eval records; tb/ TensorBoard events

A curriculum root (`perspective-train --stage all`) holds one such directory per
stage (`config.choices.CURRICULUM`).
"""

from __future__ import annotations

import json
import os
from typing import Optional

from perspective_jax.config import PerspectiveConfig, load_config, save_config
from perspective_jax.errors import UserError

CONFIG_FILE = "config.yaml"
DATA_RECORD = "data.json"


def config_path(run_dir: str) -> str:
    return os.path.join(run_dir, CONFIG_FILE)


def has_config(run_dir: str) -> bool:
    return os.path.exists(config_path(run_dir))


def load_run_config(run_dir: str) -> PerspectiveConfig:
    """The resolved config a run trained with (raises ConfigError naming the file)."""
    return load_config(config_path(run_dir))


def save_run_config(cfg: PerspectiveConfig, run_dir: str) -> None:
    save_config(cfg, config_path(run_dir))


def load_data_record(run_dir: str) -> Optional[dict]:
    """{"token_store": <hash>, "source": <what --data/data.path named>} written at
    the run's first start, or None when the run has none (a run from before the
    record existed). A damaged record is a one-line error naming the file."""
    path = os.path.join(run_dir, DATA_RECORD)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            record = json.load(fh)
    except (OSError, ValueError) as exc:
        record = exc
    if not (isinstance(record, dict) and isinstance(record.get("token_store"), str)):
        raise UserError(f"{path} is damaged (not a data record); delete it to let the "
                        "resume adopt the data it is given, or use a new --run-dir")
    return record


def save_data_record(run_dir: str, record: dict) -> None:
    path = os.path.join(run_dir, DATA_RECORD)
    with open(path + ".tmp", "w") as fh:
        json.dump({"format": 1, **record}, fh, indent=2)
    os.replace(path + ".tmp", path)
