"""What a run directory fixes for every later start: checked before training.

A resume must keep the parameter shapes, the data stream (token store, data.*
and train.* values that order it) and the ternary schedule's length; a new run
started `--init-from` another needs only the same parameter shapes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax

from perspective_jax.config import PerspectiveConfig
from perspective_jax.errors import UserError
from perspective_jax.model.transformer import abstract_params
from perspective_jax.data.tokenizer import BYTE_MARKER, SPM_FILE
from perspective_jax.fileio import sha256_file
from perspective_jax.rundir.layout import (CONFIG_FILE, DATA_RECORD, config_path,
                                           load_data_record, load_run_config,
                                           save_data_record)


def _shape_signature(cfg: PerspectiveConfig) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(abstract_params(cfg.model, cfg.moe))[0]
    return {jax.tree_util.keystr(p): (tuple(a.shape), str(a.dtype)) for p, a in leaves}


def _shape_changes(saved: PerspectiveConfig, cfg: PerspectiveConfig) -> Optional[str]:
    """None if both configs give the same parameter shapes, else the model.*/moe.*
    values that differ ('model.d_model: 32 -> 48; ...')."""
    if _shape_signature(saved) == _shape_signature(cfg):
        return None
    changed = []
    for section in ("model", "moe"):
        old, new = getattr(saved, section), getattr(cfg, section)
        changed += [f"{section}.{f.name}: {getattr(old, f.name)!r} -> {getattr(new, f.name)!r}"
                    for f in dataclasses.fields(new)
                    if getattr(old, f.name) != getattr(new, f.name)]
    return "; ".join(changed) or "another parameter layout"


def ensure_run_dir(run_dir: str) -> None:
    """Create the run directory, or say in one line why it cannot be used."""
    try:
        os.makedirs(run_dir, exist_ok=True)
    except FileExistsError:
        raise UserError(f"--run-dir {run_dir} is an existing file, not a directory; "
                        "pass a directory path") from None
    except OSError as exc:
        raise UserError(f"--run-dir {run_dir}: cannot create it ({exc.strerror}); "
                        "pass a path in a writable directory") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise UserError(f"--run-dir {run_dir} is not writable; pass another directory")


def source_config(init_from: str) -> PerspectiveConfig:
    """The resolved config of the run that --init-from names."""
    if not os.path.isdir(init_from):
        raise UserError(f"--init-from {init_from}: no such directory; pass the run "
                        "directory of an earlier stage")
    if not os.path.isfile(config_path(init_from)):
        raise UserError(f"--init-from {init_from}: no {CONFIG_FILE}; is it a "
                        "perspective-train run directory?")
    return load_run_config(init_from)


def check_init_compatible(init_from: str, cfg: PerspectiveConfig) -> None:
    """Refuse --init-from a run whose parameters have other shapes than `cfg`'s."""
    changes = _shape_changes(source_config(init_from), cfg)
    if changes:
        raise UserError(f"--init-from {init_from} holds a model of another shape ({changes}); "
                        "use the same model.* and moe.* values as that run")


def check_resume_compatible(saved: PerspectiveConfig, cfg: PerspectiveConfig,
                            run_dir: str) -> None:
    """Refuse a resume whose config changes parameter shapes or the data stream."""
    changes = _shape_changes(saved, cfg)
    if changes:
        raise UserError(f"{run_dir} holds a model of another shape ({changes}); "
                        "resume with the original config, or use a new --run-dir "
                        "(optionally --init-from)")
    for section, keys in (("data", ("seq_len", "tokenizer", "seed", "val_fraction")),
                          ("train", ("batch_size", "grad_accum", "seed"))):
        for key in keys:
            a, b = getattr(getattr(saved, section), key), getattr(getattr(cfg, section), key)
            if a != b:
                raise UserError(f"{run_dir} was trained with {section}.{key}={a!r}; resuming "
                                f"with {b!r} would not continue the same data stream — "
                                "use the original value or a new --run-dir")


def pin_schedule(cfg: PerspectiveConfig, saved: Optional[PerspectiveConfig],
                 run_dir: str) -> PerspectiveConfig:
    """`cfg` with `ternary.schedule_steps` fixed: at a ternary stage's first start
    (`saved` None) to its own value or train.steps; on resume to the saved run's
    (older runs: the saved train.steps), refusing an explicit other value."""
    if not cfg.ternary.enabled:
        return cfg
    pinned = cfg.ternary.schedule_steps or cfg.train.steps
    if saved is not None and saved.ternary.enabled:
        kept = saved.ternary.schedule_steps or saved.train.steps
        if cfg.ternary.schedule_steps not in (0, kept):
            raise UserError(f"{run_dir} ternarises over ternary.schedule_steps={kept}; "
                            f"resuming with {cfg.ternary.schedule_steps} would move the "
                            "schedule — drop the override or use a new --run-dir")
        pinned = kept
    return dataclasses.replace(cfg, ternary=dataclasses.replace(cfg.ternary,
                                                                schedule_steps=pinned))


def run_tokenizer_file(run_dir: str) -> Optional[str]:
    """The tokenizer file a run directory holds (sentencepiece first), or None."""
    for name in (SPM_FILE, BYTE_MARKER):
        if os.path.isfile(os.path.join(run_dir, name)):
            return os.path.join(run_dir, name)
    return None


def check_run_tokenizer(run_dir: str) -> None:
    """Before the run's tokenizer is loaded: it must be the file the run started with
    (its sha256 is in the data record); damage or a replacement is one line."""
    record = load_data_record(run_dir)
    path = run_tokenizer_file(run_dir)
    if record is None or path is None or "tokenizer_sha256" not in record:
        return
    if sha256_file(path) != record["tokenizer_sha256"]:
        raise UserError(f"{path} is not the tokenizer this run started with (its sha256 "
                        f"differs from the one in {DATA_RECORD}: damaged or replaced); "
                        "restore it, or use a new --run-dir")


def check_data_record(run_dir: str, store: str, source: str, resuming: bool) -> None:
    """At a first start record the token store (a hash of the tokenised corpus, its
    split and tokenizer); on resume refuse another one. Runs from before the record
    existed adopt the current store."""
    record = load_data_record(run_dir) if resuming else None
    if record is None:
        path = run_tokenizer_file(run_dir)
        save_data_record(run_dir, {"token_store": store, "source": source,
                                   **({"tokenizer_sha256": sha256_file(path)} if path else {})})
    elif record["token_store"] != store:
        raise UserError(f"{run_dir} was trained on token store {record['token_store']} "
                        f"({record.get('source', '?')}); this call gives {store} ({source}) — "
                        "resume with the original data, or use a new --run-dir "
                        f"(optionally --init-from {run_dir})")
