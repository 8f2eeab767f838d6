"""Export a trained run to a model directory (SPEC §3.5; layout in `infer.model_dir`).

    export_model(run_dir, out_dir, force=False, shared_bits=0, ...) -> manifest

The export is written into a sibling staging directory and renamed into place
only when every file and finally the manifest are on disk, so an interrupted
export never looks complete; `--force` replaces only an earlier export, never a
run directory or other files (`modeldir.publish`). Free space is checked against
the export's size before any heavy work (`export.space`); a write that fails
anyway (a full disk) is one line naming the file and the bytes needed, and
leaves nothing behind. Experts are the exact ternary values
the trained model computes with: trits = clip(round(W / (mean|W| + ε)), −1, 1),
scale = mean|W| per matrix (`ternary.quant.ternarize`). With `--shared-bits` the
shared kernels are GPTQ-quantised and the tied embedding is written int8 with a row
scale (`infer.embedding_int8`; `--embedding float32` keeps it exact). The chat
template a server formats conversations with (`--chat-template`, a built-in name or
a .jinja file, checked first) is written beside the tokenizer. A safety polytope
(`--polytope FILE`, or the one of a safety run given as --run-dir, whose source
run is then exported) is written as polytope.spp and listed (`export.polytope`).
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save

from perspective_jax.config import PerspectiveConfig, to_dict
from perspective_jax.config.choices import CURRICULUM
from perspective_jax.config.param_layout import expert_layers, map_routed_ffns, routed_ffns
from perspective_jax.data.token_store import latest_token_store
from perspective_jax.data.tokenizer import copy_tokenizer, load_tokenizer
from perspective_jax.errors import UserError
from perspective_jax.export.polytope import polytope_for, run_polytope, write_model_polytope
from perspective_jax.export.space import check_free_space, expected_bytes
from perspective_jax.fileio import DiskError, disk_error, naming
from perspective_jax.modeldir import format as md
from perspective_jax.modeldir.chat_template import resolve_chat_template, write_chat_template
from perspective_jax.quant import embedding_int8
from perspective_jax.modeldir import publish
from perspective_jax.model.cache_io import flatten_cache
from perspective_jax.model.transformer import PerspectiveLM, abstract_params
from perspective_jax.moe import torus
from perspective_jax.quant.ternary import ternary_codes
from perspective_jax.rundir.checkpoint import latest_complete_step, restore_params
from perspective_jax.rundir.layout import (CONFIG_FILE, has_config, load_run_config,
                                           load_safety_record)
from perspective_jax.safety.polytope import Polytope


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


def ternary_experts(w, granularity: str = "tensor") -> tuple[np.ndarray, np.ndarray]:
    """[..., K, N] float → (trits int8 [..., K, N], scale float32 [..., S]),
    S = 1 (per matrix) or N (per output feature)."""
    trits, scale = ternary_codes(jnp.asarray(w, jnp.float32), granularity)
    return np.asarray(trits, np.int8), np.asarray(scale[..., 0, :], np.float32)


def routing_frequencies(cfg: PerspectiveConfig, params, tokens, chunk: int = 512):
    """[L_expert, E] share of calibration tokens routed to each expert (uniform if none)."""
    layers = expert_layers(cfg.model)
    e = cfg.moe.num_experts
    if tokens is None:
        return np.full((len(layers), e), 1.0 / e)
    model = PerspectiveLM(cfg.model, cfg.moe)
    fn = jax.jit(lambda p, t: model.apply({"params": p}, t, mutable=["aux"])[1]["aux"])
    counts = np.zeros((len(layers), e))
    for s in range(0, tokens.shape[1] - 1, chunk):
        part = tokens[:, s: s + chunk]
        if part.shape[1] < 2:
            break
        aux = fn(params, jnp.asarray(part))
        for j, (p, i) in enumerate(layers):
            c = dict(routed_ffns(aux, cfg.model))[i]["counts"]
            counts[j] += np.asarray(c[0] if isinstance(c, tuple) else c)[p]
    total = counts.sum(1, keepdims=True)
    return np.where(total > 0, counts / np.maximum(total, 1), 1.0 / e)   # none seen: uniform


def stacked_key(period_path: str) -> str:
    """'periods/3/layer_0/mixer/w_q/kernel' → 'periods/layer_0/mixer/w_q/kernel'."""
    parts = period_path.split("/")
    return "/".join(parts[:1] + parts[2:])


def flatten_params(tree) -> dict[str, np.ndarray]:
    """{'/'-joined path: contiguous numpy array} — the safetensors layout."""
    return {k: np.ascontiguousarray(v) for k, v in flatten_cache(tree).items()}


def write_expert_files(out: str, layout: md.RegionLayout, n_layers: int, lattice,
                       layer_regions, delta_max_share: float, log=print) -> list[dict]:
    """experts/ and deltas/ files for every expert layer; returns the manifest index.

    layer_regions(j) -> list of E flat uint8 regions of expert layer j."""
    pairs = torus.neighbour_pairs(tuple(lattice))
    directed = [(int(a), int(b)) for a, b in pairs] + [(int(b), int(a)) for a, b in pairs]
    for sub in ("experts", "deltas"):
        with naming(os.path.join(out, sub)):
            os.makedirs(os.path.join(out, sub))
    index, n_deltas, delta_bytes = [], 0, 0
    for j in range(n_layers):
        regions = layer_regions(j)
        entries = []
        path = os.path.join(out, md.expert_file(j))
        with naming(path), open(path, "wb") as fh:
            for x, region in enumerate(regions):
                entries.append({"expert": x, "offset": x * layout.stride,
                                md.REGION_CHECKSUM: md.region_digest(region)})
                fh.write(region.tobytes() + b"\0" * (layout.stride - layout.nbytes))
        deltas = []
        path = os.path.join(out, md.delta_file(j))
        with naming(path), open(path, "wb") as fh:
            at = 0
            for a, b in directed:
                if 5 * np.count_nonzero(regions[a] != regions[b]) > (delta_max_share
                                                                     * layout.nbytes):
                    continue                      # cheaper to move the full region
                pos, val = md.encode_delta(regions[a], regions[b])
                rec = md.delta_record(pos, val)
                deltas.append({"src": a, "dst": b, "offset": at, "count": int(len(pos)),
                               md.REGION_CHECKSUM: md.region_digest(rec)})
                fh.write(rec)
                at += len(rec)
                delta_bytes += len(rec)
        n_deltas += len(deltas)
        index.append({"layer": j, "file": md.expert_file(j), "regions": entries,
                      "delta_file": md.delta_file(j), "deltas": deltas})
    n_experts = len(regions) if n_layers else 0
    log(f"experts: {n_layers} layers × {n_experts} experts, {layout.nbytes / 1e6:.3f} MB "
        f"per region; {n_deltas} of {n_layers * len(directed)} neighbour deltas kept "
        f"({delta_bytes / 1e6:.3f} MB)")
    return index


def _write_experts(out: str, cfg: PerspectiveConfig, params, delta_max_share: float, log):
    """Ternarise the trained experts and write them; returns (index, {name: scales
    [L, E, S]})."""
    layout = md.RegionLayout(cfg.model.d_model, cfg.model.d_ff)
    layers = expert_layers(cfg.model)
    ffns = dict(routed_ffns(params, cfg.model))
    granularity = cfg.ternary.scale_granularity
    scales = {}

    def layer_regions(j):
        p, i = layers[j]
        ffn = ffns[i]
        quant = {n: ternary_experts(np.asarray(ffn[n][p]), granularity)
                 for n in md.EXPERT_MATRICES}
        for name in md.EXPERT_MATRICES:
            s = quant[name][1]                                       # [E, S]
            scales.setdefault(name, np.zeros((len(layers), *s.shape), np.float32))[j] = s
        return [md.pack_region({n: quant[n][0][x] for n in md.EXPERT_MATRICES}, layout)
                for x in range(cfg.moe.num_experts)]

    index = write_expert_files(out, layout, len(layers), cfg.moe.lattice, layer_regions,
                               delta_max_share, log)
    return index, scales


def export_model(run_dir: str, out_dir: str, force: bool = False, shared_bits: int = 0,
                 group_size: int = 64, calibration_text: Optional[str] = None,
                 calibration_tokens_n: int = 4096, delta_max_share: float = 0.5,
                 embedding: Optional[str] = None, space_check: bool = True,
                 chat_template: Optional[str] = None, polytope: Optional[str] = None,
                 log=print) -> dict:
    """Write `out_dir` from the latest checkpoint of `run_dir`; returns the manifest.
    `embedding` None means int8 when `shared_bits` is set (SPEC §3.4), else float32;
    `space_check` False skips the free-space check (--skip-space-check);
    `chat_template` is a built-in template name or a .jinja file (None: the default);
    `polytope` a polytope file to add (None: a safety run's own, else none)."""
    resolve_chat_template(chat_template)      # a bad template: say so before any work
    embedding = default_embedding(embedding, shared_bits)
    _check_args(shared_bits, delta_max_share, group_size, embedding)
    if calibration_tokens_n < 2:
        raise UserError(f"--calibration-tokens {calibration_tokens_n}: must be >= 2")
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
    log(f"exporting {run} ({cfg.name})" + (f" with the safety polytope {polytope}"
                                            if poly is not None else ""))
    params = restore_params(run, like, source="--run-dir")
    calib = calibration_tokens(run, calibration_tokens_n, calibration_text)
    return write_model_dir(out_dir, cfg, params, run, calib, force, shared_bits, group_size,
                           delta_max_share, embedding, log, space_check=False,
                           chat_template=chat_template, polytope=poly)


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


def write_model_dir(out_dir: str, cfg: PerspectiveConfig, params, tokenizer_dir: str,
                    calib=None, force: bool = False, shared_bits: int = 0,
                    group_size: int = 64, delta_max_share: float = 0.5,
                    embedding: Optional[str] = None, log=print,
                    space_check: bool = True, chat_template: Optional[str] = None,
                    polytope: Optional[Polytope] = None) -> dict:
    """Write a model directory for `params` atomically: everything goes to a sibling
    staging directory that is renamed into place after the manifest is written. A
    failed write (OSError) is one line naming the file and the bytes the export needs
    (`fileio.disk_error`); the staging directory is removed. `chat_template`: a
    built-in template name or a .jinja file (`modeldir.chat_template`; None: the
    default); `polytope` a safety polytope to write and list (`export.polytope`)."""
    embedding = default_embedding(embedding, shared_bits)
    _check_args(shared_bits, delta_max_share, group_size, embedding)
    template = resolve_chat_template(chat_template)
    publish.check_destination(out_dir, force, protected=(tokenizer_dir,))
    out_dir = os.path.abspath(out_dir)
    needed = expected_bytes(cfg, params, shared_bits, embedding)
    if space_check:
        check_free_space(out_dir, needed)
    params = jax.tree.map(np.asarray, params)
    tmp = publish.staging_dir(out_dir)
    try:
        manifest = _export_into(tmp, tokenizer_dir, cfg, params, calib, shared_bits,
                                group_size, delta_max_share, embedding, template, log,
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


def _export_into(out, run, cfg, params, calib, shared_bits, group_size, delta_max_share,
                 embedding, template, log, polytope=None):
    routed = cfg.model.routed
    shared = jax.tree.map(lambda a: a, params)
    experts_index, scales = [], None
    used = params
    if routed:
        experts_index, scales = _write_experts(out, cfg, params, delta_max_share, log)
        used = with_ternary_experts(params, cfg)
        shared = map_routed_ffns(shared, cfg.model, lambda _, ffn: {
            k: v for k, v in ffn.items() if k not in md.EXPERT_MATRICES})
    tensors = flatten_params(shared)
    if embedding == "int8":       # calibration and routing then see the int8 embedding
        used = with_embedding(used, embedding_int8.quantize_in_place(tensors))
    quantized = []
    if shared_bits:
        if calib is None:
            raise UserError("--shared-bits needs calibration text: the run has no token "
                            "store; pass --calibration-text FILE")
        from perspective_jax.export.calibrate import quantize_shared, shared_linear_hessians
        hessians = shared_linear_hessians(cfg.model, cfg.moe, used, calib)
        qt, report = quantize_shared(used, hessians, bits=shared_bits, group_size=group_size)
        for path, err_gptq, err_rtn in report:
            tensors.pop(stacked_key(path), None)   # replaced by its per-period groups
            quantized.append({"path": path, "rel_error": float(err_gptq),
                              "rel_error_rtn": float(err_rtn)})
        tensors.update(qt)
        log(f"shared kernels quantised to {shared_bits} bits (GPTQ, group {group_size}): "
            f"{len(quantized)} tensors")
    for name, value in (scales or {}).items():
        tensors[md.scale_key(name)] = value
    save_tensors(tensors, os.path.join(out, md.SHARED_FILE))
    with naming(out):
        copy_tokenizer(run, out)
    template_entry = write_chat_template(out, *template)
    safety_entry = (None if polytope is None else
                    write_model_polytope(out, polytope, used["embed"]["embedding"]))
    freqs = routing_frequencies(cfg, used, calib) if routed else None
    shared_meta = {"file": md.SHARED_FILE, "bits": shared_bits, "group_size": group_size,
                   "quantized": quantized, "embedding": embedding,
                   "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)}
                               for k, v in tensors.items()}}
    return md.write_manifest(out, to_dict(cfg), os.path.basename(os.path.abspath(run)),
                             shared_meta, experts_index, freqs, template_entry, safety_entry)


def save_tensors(tensors: dict, path: str) -> None:
    """A safetensors file written by Python, so that a failed write (a full disk) is an
    OSError naming `path`, never half a file that passes for a whole one."""
    data = save(tensors)
    with naming(path), open(path, "wb") as fh:
        fh.write(data)


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
            trits, scale = ternary_experts(ffn[name], cfg.ternary.scale_granularity)
            ffn[name] = trits.astype(np.float32) * scale[..., None, :]
        return ffn
    return map_routed_ffns(params, cfg.model, exact)
