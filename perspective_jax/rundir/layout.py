"""What a training run directory holds, and its resolved config.

    RUN_DIR/
      config.yaml      the resolved config the stage trained with (CONFIG_FILE)
      checkpoints/     orbax checkpoints, one per saved step (`rundir.checkpoint`)
      tokenizer.*      the tokenizer in use; data/<hash>/ the cached token files
      data.json        the token store the run started on (DATA_RECORD): resumes
                       must use the same one
      metrics.jsonl    train/eval records; tb/ TensorBoard events

A `safety` stage's directory (`train.safety_stage`) holds no checkpoints: config.yaml,
the polytope file, safety_report.json and SAFETY_RECORD (the source run it was built
from and the polytope's name; written last, so its presence means finished).

A curriculum root (`perspective-train --stage all`) holds one such directory per
stage (`config.choices.CURRICULUM`).
"""

from __future__ import annotations

import json
import os
from typing import Optional

from perspective_jax.config import PerspectiveConfig, load_config, save_config
from perspective_jax.errors import UserError
from perspective_jax.fileio import atomic_write, seal, seal_holds, sha256_bytes

CONFIG_FILE = "config.yaml"
DATA_RECORD = "data.json"
SAFETY_RECORD = "safety.json"


def config_path(run_dir: str) -> str:
    return os.path.join(run_dir, CONFIG_FILE)


def has_config(run_dir: str) -> bool:
    return os.path.exists(config_path(run_dir))


CONFIG_SEAL = "# sha256 of the lines above: "


def load_run_config(run_dir: str) -> PerspectiveConfig:
    """The resolved config a run trained with, checked against the digest its last line
    carries (raises a one-line error naming the file). Runs written before the digest
    existed have none and are read unverified."""
    path = config_path(run_dir)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror})") from None
    body, _, last = raw.rstrip(b"\n").rpartition(b"\n")
    if last.startswith(CONFIG_SEAL.encode()):
        if last[len(CONFIG_SEAL):].decode("ascii", "replace") != sha256_bytes(body + b"\n"):
            raise UserError(f"{path} does not match its checksum (damaged or edited after "
                            "the run wrote it); restore it, or start a new --run-dir")
    return load_config(path)


def save_run_config(cfg: PerspectiveConfig, run_dir: str) -> None:
    """Write config.yaml atomically, its last line the sha256 of the lines above."""
    path = config_path(run_dir)
    tmp = f"{path}.yaml-tmp"
    save_config(cfg, tmp)
    with open(tmp, "rb") as fh:
        body = fh.read()
    os.remove(tmp)
    if not body.endswith(b"\n"):
        body += b"\n"
    atomic_write(path, body + f"{CONFIG_SEAL}{sha256_bytes(body)}\n".encode())


def _read_json(path: str):
    """The JSON value in `path`, or the exception reading it raised (the callers
    check the record's seal and shape and name the damaged file)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        return exc


def load_data_record(run_dir: str) -> Optional[dict]:
    """{"token_store": <hash>, "source": <what --data/data.path named>} written at
    the run's first start, or None when the run has none (a run from before the
    record existed). A damaged record is a one-line error naming the file."""
    path = os.path.join(run_dir, DATA_RECORD)
    if not os.path.exists(path):
        return None
    record = _read_json(path)
    sealed_ok = seal_holds(record) or (isinstance(record, dict) and "sha256" not in record
                                       and record.get("format") == 1)  # before the seal
    if not (sealed_ok and isinstance(record.get("token_store"), str)):
        raise UserError(f"{path} is damaged (not a data record, or it fails its checksum); "
                        "delete it to let the resume adopt the data it is given, or use a "
                        "new --run-dir")
    return record


def save_data_record(run_dir: str, record: dict) -> None:
    path = os.path.join(run_dir, DATA_RECORD)
    atomic_write(path, json.dumps(seal({"format": 2, **record}), indent=2))


def load_safety_record(run_dir: str) -> Optional[dict]:
    """{"source": <the run the polytope was built from, absolute>, "polytope": <its
    file name in run_dir>, ...} of a finished safety stage, or None when `run_dir` is
    not one. A damaged record is a one-line error naming the file."""
    path = os.path.join(run_dir, SAFETY_RECORD)
    if not os.path.exists(path):
        return None
    record = _read_json(path)
    if not (seal_holds(record) and isinstance(record.get("source"), str)
            and isinstance(record.get("polytope"), str)):
        raise UserError(f"{path} is damaged (not a safety record, or it fails its checksum); "
                        "re-run the safety stage into a new --run-dir")
    return record


def save_safety_record(run_dir: str, record: dict) -> None:
    path = os.path.join(run_dir, SAFETY_RECORD)
    atomic_write(path, json.dumps(seal({"format": 1, **record}), indent=2))
