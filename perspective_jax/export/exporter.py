"""Export a trained run to a model directory (SPEC §3.5; layout in `infer.model_dir`).

    export_model(run_dir, out_dir, force=False, shared_bits=0, ..., max_host_mb=None)

The export is written into a sibling staging directory and renamed into place
only when every file and finally the manifest are on disk, so an interrupted
export never looks complete; `--force` replaces only an earlier export, never a
run directory or other files (`modeldir.publish`). Free space is checked against
the export's size before any heavy work (`export.space`); a write that fails
anyway (a full disk) is one line naming the file and the bytes needed, and
leaves nothing behind. The files are written one period at a time
(`export.stream`): experts as the exact ternary values the trained model computes
with (`export.experts`), with `--shared-bits` the shared kernels GPTQ-quantised and
the tied embedding int8 with a row scale (`--embedding float32` keeps it exact).
The chat template a server formats conversations with (`--chat-template`, a
built-in name or a .jinja file, checked first) is written beside the tokenizer. A
safety polytope (`--polytope FILE`, or the one of a safety run given as --run-dir,
whose source run is then exported) is written as polytope.spp and listed
(`export.polytope`).

Without `max_host_mb` the checkpoint is restored whole (one orbax read). With it
(`--max-host-mb N`, MB = 2^20 bytes) the parameters are read from the checkpoint
piece by piece (`rundir.partial_restore`): a leaf outside the periods, then one
period at a time, so the working set is the larger of those two moments
(`model.footprint.export_stream_parts`); an export whose working set exceeds N is
refused up front, naming the moment that does not fit and the smallest N that
would. Both ways write the same bytes. N counts the arrays the export holds, not
the process itself (Python, the JAX runtime and its compiled programs).
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Optional

import numpy as np

from perspective_jax.config import PerspectiveConfig
from perspective_jax.config.choices import CURRICULUM
from perspective_jax.config.param_layout import map_routed_ffns
from perspective_jax.data.token_store import latest_token_store
from perspective_jax.data.tokenizer import load_tokenizer
from perspective_jax.errors import UserError
from perspective_jax.export.calibrate import shared_shapes
from perspective_jax.export.experts import exact_value, ternary_experts
from perspective_jax.export.polytope import polytope_for, run_polytope
from perspective_jax.export.routing import RoutingPass
from perspective_jax.export.sources import PERIODS, CheckpointSource, TreeSource, leaf_paths
from perspective_jax.export.space import check_free_space, expected_bytes
from perspective_jax.export.stream import ExportOptions, export_into
from perspective_jax.fileio import DiskError, disk_error
from perspective_jax.model import footprint
from perspective_jax.model.cache_io import flatten_cache
from perspective_jax.model.census import human_bytes
from perspective_jax.modeldir import format as md
from perspective_jax.modeldir import publish
from perspective_jax.modeldir.chat_template import resolve_chat_template
from perspective_jax.model.transformer import abstract_params
from perspective_jax.quant import embedding_int8
from perspective_jax.rundir.checkpoint import latest_complete_step, restore_params
from perspective_jax.rundir.layout import (CONFIG_FILE, has_config, load_run_config,
                                           load_safety_record)
from perspective_jax.rundir.partial_restore import ParamReader
from perspective_jax.safety.polytope import Polytope

MB = 2 ** 20


def resolve_run(run_dir: str, log=print) -> str:
    """A stage run directory (exported even if unfinished, with a note), the last
    finished stage of a curriculum root (its checkpoint is at the stage's last step),
    or for a safety run the run its polytope was built from."""
    record = load_safety_record(run_dir)
    if record is not None:
        source = record["source"]
        if not os.path.isdir(source) or load_safety_record(source) is not None:
            raise UserError(f"--run-dir {run_dir} is a safety run whose source run {source} "
                            "is missing; restore it, or rebuild the polytope")
        return resolve_run(source, log)
    if has_config(run_dir) and os.path.isdir(
            os.path.join(run_dir, "checkpoints")):
        steps, done = load_run_config(run_dir).train.steps, \
            latest_complete_step(run_dir)
        if done is not None and done < steps:
            log(f"note: {run_dir} is unfinished (checkpoint at step {done} of {steps}); "
                "exporting it as it is")
        return run_dir
    for stage in reversed(CURRICULUM):
        sub = os.path.join(run_dir, stage)
        if not has_config(sub):
            continue
        done = latest_complete_step(sub)
        if done is None:
            continue
        steps = load_run_config(sub).train.steps
        if done >= steps:
            return sub
        log(f"note: stage {stage} is unfinished (checkpoint at step {done} of {steps}); "
            f"skipped — pass --run-dir {sub} to export it anyway")
    raise UserError(f"--run-dir {run_dir}: no finished perspective-train run there (expected "
                    f"{CONFIG_FILE} and checkpoints/, or stage subdirectories {CURRICULUM})")


def calibration_tokens(run_dir: str, n_tokens: int, text_file: Optional[str] = None):
    """[1, n] int32 calibration ids: from `text_file`, else the run's validation split."""
    if text_file:
        if not os.path.isfile(text_file):
            raise UserError(f"--calibration-text {text_file}: no such file")
        with open(text_file, encoding="utf-8", errors="replace") as fh:
            ids = load_tokenizer(run_dir).encode(fh.read())
        if len(ids) < 2:
            raise UserError(f"--calibration-text {text_file}: too little text to calibrate "
                            "with (at least 2 tokens); give a longer file")
    else:
        store = latest_token_store(run_dir)
        if store is None:
            return None
        train_split, val_split = store
        ids = (val_split if len(val_split.tokens) else train_split).tokens
    ids = np.asarray(ids[:n_tokens], np.int32)
    return ids[None] if ids.size else None


def flatten_params(tree) -> dict[str, np.ndarray]:
    """{'/'-joined path: contiguous numpy array} — the safetensors layout."""
    return {k: np.ascontiguousarray(v) for k, v in flatten_cache(tree).items()}


def export_model(run_dir: str, out_dir: str, force: bool = False, shared_bits: int = 0,
                 group_size: int = 64, calibration_text: Optional[str] = None,
                 calibration_tokens_n: int = 4096, delta_max_share: float = 0.5,
                 embedding: Optional[str] = None, space_check: bool = True,
                 chat_template: Optional[str] = None, polytope: Optional[str] = None,
                 max_host_mb: Optional[int] = None, log=print) -> dict:
    """Write `out_dir` from the latest checkpoint of `run_dir`; returns the manifest.
    `embedding` None means int8 when `shared_bits` is set (SPEC §3.4), else float32;
    `space_check` False skips the free-space check (--skip-space-check);
    `chat_template` is a built-in template name or a .jinja file (None: the default);
    `polytope` a polytope file to add (None: a safety run's own, else none);
    `max_host_mb` streams from the checkpoint within that many MB (module docstring)."""
    resolve_chat_template(chat_template)      # a bad template: say so before any work
    embedding = default_embedding(embedding, shared_bits)
    _check_args(shared_bits, delta_max_share, group_size, embedding)
    if calibration_tokens_n < 2:
        raise UserError(f"--calibration-tokens {calibration_tokens_n}: must be >= 2")
    if max_host_mb is not None and max_host_mb < 1:
        raise UserError(f"--max-host-mb {max_host_mb}: must be >= 1")
    run = resolve_run(run_dir, log)
    load_tokenizer(run)                       # no tokenizer: say so before any heavy work
    publish.check_destination(out_dir, force, protected=(run_dir, run))
    shutil.rmtree(publish.staging_dir(out_dir))   # --out's place can be written
    cfg = load_run_config(run)
    if cfg.model.routed and not cfg.ternary.enabled:
        raise UserError(f"{run} holds a routed model whose experts are not ternary yet; "
                        "export the result of the ternary or align stage")
    polytope = polytope or run_polytope(run_dir)
    poly = polytope_for(polytope, cfg) if polytope else None      # checked before heavy work
    like = abstract_params(cfg.model, cfg.moe)
    if space_check:                           # before restoring: shapes suffice
        check_free_space(out_dir, expected_bytes(cfg, like, shared_bits, embedding))
    opts = ExportOptions(shared_bits, group_size, delta_max_share, embedding)
    if max_host_mb is None:
        log(f"exporting {run} ({cfg.name})" + (f" with the safety polytope {polytope}"
                                                if poly is not None else ""))
        source = TreeSource(restore_params(run, like, source="--run-dir"))
    else:
        source = CheckpointSource(ParamReader(run, source="--run-dir"), like)
        largest = check_host_cap(cfg, opts, calibration_tokens_n, max_host_mb, source)
        log(f"exporting {run} ({cfg.name}) piece by piece within --max-host-mb {max_host_mb} "
            f"(largest piece ~{math.ceil(largest / MB)} MB)" + (
                f" with the safety polytope {polytope}" if poly is not None else ""))
        source.reader.verify()
    calib = calibration_tokens(run, calibration_tokens_n, calibration_text)
    return _write(out_dir, cfg, source, run, calib, force, opts, chat_template, log,
                  space_check=False, polytope=poly)


def check_host_cap(cfg: PerspectiveConfig, opts: ExportOptions, calibration_tokens_n: int,
                   max_host_mb: int, source: CheckpointSource) -> int:
    """Refuse (one line) a streamed export whose working set exceeds `max_host_mb`;
    returns the bytes of its largest moment. Reads the checkpoint's chunk sizes only."""
    like = source.like
    outside = [k for k in leaf_paths(like) if not k.startswith(PERIODS + "/")]
    stacked = [f"{PERIODS}/{k}" for k in leaf_paths(like[PERIODS])]
    chunks = source.chunk_bytes(outside + stacked)
    needs = stream_needs(cfg, opts, calibration_tokens_n, (
        max([chunks[k] for k in outside], default=0),
        max([chunks[k] for k in stacked], default=0)))
    largest = max(needs, key=lambda n: n.total)
    if largest.total > max_host_mb * MB:
        parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in largest.parts if v)
        raise UserError(f"--max-host-mb {max_host_mb}: {largest.what.split(': ', 1)[1]} of "
                        f"the export needs ~{math.ceil(largest.total / MB)} MB ({parts}); "
                        f"pass --max-host-mb {math.ceil(largest.total / MB)} or more")
    return largest.total


def default_embedding(embedding: Optional[str], shared_bits: int) -> str:
    """The embedding format to write: as given, else int8 for a quantised export."""
    return embedding or ("int8" if shared_bits else "float32")


def _check_args(shared_bits, delta_max_share, group_size, embedding="float32") -> None:
    if embedding not in embedding_int8.FORMATS:
        raise UserError(f"--embedding {embedding}: use one of {', '.join(embedding_int8.FORMATS)}")
    if shared_bits not in (0, 2, 3, 4, 8):
        raise UserError(f"--shared-bits {shared_bits}: use 0 (float32) or 2, 3, 4, 8")
    if group_size < 1:
        raise UserError(f"--group-size {group_size}: must be >= 1 (input rows per GPTQ group)")
    if not 0.0 <= delta_max_share <= 1.0:
        raise UserError(f"--delta-max-share {delta_max_share}: must lie in [0, 1]")


def stream_needs(cfg: PerspectiveConfig, opts: ExportOptions, calibration_tokens_n: int,
                 chunks: tuple = (0, 0)) -> list:
    """`footprint.export_need` of a streamed export, with this model's kernel shapes and
    the checkpoint's largest chunks (outside the periods, in them)."""
    inputs, kernels = (shared_shapes(cfg.model, cfg.moe) if opts.shared_bits
                       else (None, None))
    return footprint.export_need(cfg, opts.shared_bits, calibration_tokens_n, streamed=True,
                                 embedding=opts.embedding, chunks=chunks, inputs=inputs,
                                 kernels=kernels)


def write_model_dir(out_dir: str, cfg: PerspectiveConfig, params, tokenizer_dir: str,
                    calib=None, force: bool = False, shared_bits: int = 0,
                    group_size: int = 64, delta_max_share: float = 0.5,
                    embedding: Optional[str] = None, log=print,
                    space_check: bool = True, chat_template: Optional[str] = None,
                    polytope: Optional[Polytope] = None) -> dict:
    """Write a model directory for `params` (in memory) atomically: everything goes to
    a sibling staging directory that is renamed into place after the manifest is
    written. A failed write (OSError) is one line naming the file and the bytes the
    export needs (`fileio.disk_error`); the staging directory is removed.
    `chat_template`: a built-in template name or a .jinja file
    (`modeldir.chat_template`; None: the default); `polytope` a safety polytope to
    write and list (`export.polytope`)."""
    embedding = default_embedding(embedding, shared_bits)
    _check_args(shared_bits, delta_max_share, group_size, embedding)
    opts = ExportOptions(shared_bits, group_size, delta_max_share, embedding)
    return _write(out_dir, cfg, TreeSource(params), tokenizer_dir, calib, force, opts,
                  chat_template, log, space_check, polytope)


def _write(out_dir, cfg, source, tokenizer_dir, calib, force, opts, chat_template, log,
           space_check=True, polytope=None) -> dict:
    template = resolve_chat_template(chat_template)
    publish.check_destination(out_dir, force, protected=(tokenizer_dir,))
    out_dir = os.path.abspath(out_dir)
    needed = expected_bytes(cfg, source.like, opts.shared_bits, opts.embedding)
    if space_check:
        check_free_space(out_dir, needed)
    tmp = publish.staging_dir(out_dir)
    try:
        manifest = export_into(tmp, tokenizer_dir, cfg, source, calib, opts, template, log,
                               polytope)
        publish.publish(tmp, out_dir, force)
    except (OSError, DiskError) as exc:       # named by the writer (`fileio.naming`)
        if isinstance(exc, DiskError):        # said by a helper: say it for the export
            exc, name = exc.oserror, exc.path
        else:
            name = exc.filename if isinstance(exc.filename, str) else tmp
        where = out_dir + name[len(tmp):] if name.startswith(tmp) else name
        raise disk_error(exc, where, needed) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out_dir}")
    return manifest


def routing_frequencies(cfg: PerspectiveConfig, params, tokens, chunk: int = 512):
    """[L_expert, E] share of calibration tokens routed to each expert by `params` (as
    they are; uniform where none), computed one period at a time (`export.routing`)."""
    source, rp = TreeSource(params), RoutingPass(cfg, tokens, chunk)
    rp.start(source.params)
    for p in range(cfg.model.n_periods):
        rp.period(p, source.period(p))
    return rp.frequencies()


def with_embedding(params, table):
    """A shallow copy of `params` whose tied embedding is `table`."""
    out = dict(params)
    out["embed"] = {**params["embed"], "embedding": table.astype(
        np.asarray(params["embed"]["embedding"]).dtype)}
    return out


def with_ternary_experts(params, cfg: PerspectiveConfig):
    """params with every expert matrix replaced by its exact ternary value."""
    def exact(_, ffn):
        for name in md.EXPERT_MATRICES:
            ffn[name] = exact_value(*ternary_experts(ffn[name], cfg.ternary.scale_granularity))
        return ffn
    return map_routed_ffns(params, cfg.model, exact)
