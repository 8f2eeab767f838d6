"""The `safety` stage (SPEC §3.9): the safety polytope of a trained model.

    perspective-train --stage safety --init-from runs/x/align --run-dir runs/x/safety \\
        --flagged "os.system(" [--flagged-file FILE] [--safe-data PATH ...]

1. settings: `safety.*` with the CLI's values; the flagged strings are safety.flagged
   plus the lines of safety.flagged_file (`effective_safety`);
2. the source: an align or ternary run — its config, the weights it computes with
   (`train.objective.effective_params`: ternary experts, as exported) and tokenizer;
3. safe text: `safety.safe_data` (tokenised, documents joined by EOS) or else the
   source run's own token store; cut into windows of data.seq_len tokens taken in a
   seeded order; a window whose text (its tokens and the token after it) contains a
   flagged string is dropped;
4. states: x = RMSNorm(h) [d] (what the head sees) at the positions of the kept
   windows, at most safety.max_states, split *by window* into fit and held-out;
5. `safety.build.build_polytope` → RUN_DIR/polytope.spp, safety_report.json,
   config.yaml and the safety record (`rundir.layout.SAFETY_RECORD`, written last).

A finished directory is left as it is when run again with the same settings, and
refused (one line) with other ones. `perspective-export --run-dir RUN_DIR` exports
the source model with the polytope.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.config import PerspectiveConfig, SafetyConfig, to_dict
from perspective_jax.config.choices import SAFETY_STAGE
from perspective_jax.data.corpus import expand_paths, read_documents
from perspective_jax.data.token_store import read_token_store
from perspective_jax.data.tokenizer import load_tokenizer
from perspective_jax.errors import UserError
from perspective_jax.fileio import atomic_write
from perspective_jax.model.extensions import Extensions
from perspective_jax.model.transformer import PerspectiveLM, abstract_params
from perspective_jax.rundir.checkpoint import (CHECKPOINT_DIR, latest_complete_step,
                                              restore_params)
from perspective_jax.rundir.layout import (DATA_RECORD, load_data_record, load_safety_record,
                                           save_run_config, save_safety_record)
from perspective_jax.rundir.lock import hold_run_dir
from perspective_jax.safety.build import build_polytope
from perspective_jax.safety.flags import FlagRules, emitted
from perspective_jax.safety.polytope_file import POLYTOPE_FILE, write_polytope
from perspective_jax.train.objective import effective_params, expert_activation_bits
from perspective_jax.train.resume import ensure_run_dir, source_config

REPORT_FILE = "safety_report.json"


def read_flagged_file(path: str) -> tuple[str, ...]:
    """One flagged string per line (the line ending removed, nothing else); blank lines
    and lines starting with '#' are skipped."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise UserError(f"--flagged-file {path}: cannot read it "
                        f"({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"--flagged-file {path} is not UTF-8 text (byte {exc.start})") from None
    return tuple(line for line in text.splitlines()
                 if line.strip() and not line.startswith("#"))


def with_safety_args(cfg: PerspectiveConfig, safe_data: Optional[Sequence[str]] = None,
                     flagged: Optional[Sequence[str]] = None,
                     flagged_file: Optional[str] = None) -> PerspectiveConfig:
    """`cfg` with the CLI's --safe-data / --flagged / --flagged-file, each replacing its
    `safety.*` value when given."""
    changes = {}
    if safe_data:
        changes["safe_data"] = tuple(safe_data)
    if flagged:
        changes["flagged"] = tuple(flagged)
    if flagged_file:
        changes["flagged_file"] = flagged_file
    return dataclasses.replace(cfg, safety=dataclasses.replace(cfg.safety, **changes))


def effective_safety(safety: SafetyConfig) -> SafetyConfig:
    """`safety` with its flagged strings and the flagged file's lines merged (in order,
    without repeats); none at all is a one-line error."""
    extra = read_flagged_file(safety.flagged_file) if safety.flagged_file else ()
    flagged = tuple(dict.fromkeys(safety.flagged + extra))
    if not flagged:
        raise UserError(f"--stage {SAFETY_STAGE} needs flagged strings: pass --flagged STRING "
                        "or --flagged-file FILE (or set safety.flagged)")
    return dataclasses.replace(safety, flagged=flagged)


def _safe_segments(src_run: str, src: PerspectiveConfig, safety: SafetyConfig,
                   tokenizer) -> tuple[list, str]:
    """([token arrays], a description) of the safe text: safety.safe_data tokenised
    (documents joined by EOS), else the source run's token store (train, val)."""
    if safety.safe_data:
        docs = read_documents(expand_paths(safety.safe_data, "--safe-data"),
                              src.data.binary_files)
        ids = [np.append(t, tokenizer.eos_id) for t in
               tokenizer.encode_batch([d.text for d in docs if d.text])]
        tokens = np.concatenate(ids).astype(np.int32) if ids else np.zeros((0,), np.int32)
        return [tokens], "--safe-data " + " ".join(safety.safe_data)
    record = load_data_record(src_run)
    store = read_token_store(src_run, record["token_store"]) if record else None
    if store is None:
        raise UserError(f"--init-from {src_run} has no token store of its corpus "
                        f"({DATA_RECORD} or data/ missing); pass --safe-data PATH")
    return [np.asarray(s.tokens) for s in store], (
        f"the corpus of {src_run} ({record.get('source', '?')}, token store "
        f"{record['token_store']})")


def choose_windows(segments: list, seq_len: int, appended: Sequence[bytes],
                   strings: Sequence[bytes], wanted: int, seed: int):
    """(windows [n, seq_len] int32, counts): up to `wanted` windows of the segments
    (non-overlapping, in a seeded order) whose text — their tokens and the one after
    them, which the last state predicts — contains no flagged string."""
    starts = [(i, s) for i, seg in enumerate(segments)
              for s in range(0, len(seg) - seq_len + 1, seq_len)]
    order = np.random.default_rng(seed).permutation(len(starts))
    kept, dropped, examined = [], 0, 0
    for k in order:
        if len(kept) >= wanted:
            break
        i, s = starts[k]
        examined += 1
        ids = segments[i][s: s + seq_len + 1]
        if emitted(b"".join(appended[int(t)] if int(t) < len(appended) else b"" for t in ids),
                   strings):
            dropped += 1
            continue
        kept.append(np.asarray(ids[:seq_len], np.int32))
    counts = {"windows_total": len(starts), "windows_examined": examined,
              "windows_dropped_flagged": dropped, "windows_kept": len(kept),
              "seq_len": seq_len}
    if len(kept) < 2:
        raise UserError(f"the safe text gives {len(kept)} window(s) of data.seq_len={seq_len} "
                        f"tokens without a flagged string ({len(starts)} windows, {dropped} "
                        "dropped for a flagged string); at least 2 are needed — give more "
                        "safe text (--safe-data)")
    return np.stack(kept), counts


def _keep_state(xn, _state):
    """Final transform that changes nothing and reports the state itself."""
    return xn, {"state": xn}


def collect_states(cfg: PerspectiveConfig, params, windows: np.ndarray,
                   batch: int) -> np.ndarray:
    """x = RMSNorm(h) [n, T, d] float32 at every position of `windows` [n, T]: the
    final hidden state the tied head sees (`Extensions.final_transform`'s input)."""
    model = PerspectiveLM(cfg.model, cfg.moe, activation_bits=expert_activation_bits(cfg))
    ext = Extensions(final_transform=_keep_state)

    @jax.jit
    def states(p, tokens):
        _, var = model.apply({"params": p}, tokens, ext=ext, mutable=["intermediates"])
        return var["intermediates"]["final_info"][0]["state"]

    n, out = len(windows), []
    for s in range(0, n, batch):
        part = windows[s: s + batch]
        pad = np.zeros((batch - len(part), part.shape[1]), np.int32)
        out.append(np.asarray(states(params, jnp.asarray(np.concatenate([part, pad]))))
                   [: len(part)])
    return np.concatenate(out).astype(np.float32)


def split_states(states: np.ndarray, safety: SafetyConfig) -> tuple[np.ndarray, np.ndarray]:
    """(fit [N, d], held-out [M, d]) from states [n, T, d]: whole windows are held out
    (heldout_fraction of them, at least one, never all), at most max_states states in
    all (the same seeded positions' share of every window)."""
    n, t, d = states.shape
    rng = np.random.default_rng(safety.seed + 1)
    n_held = min(max(1, round(safety.heldout_fraction * n)), n - 1)
    per = min(t, max(1, safety.max_states // n))
    if per < t:
        states = np.stack([w[np.sort(rng.choice(t, per, replace=False))] for w in states])
    held, fit = states[:n_held], states[n_held:]          # windows come in seeded order
    return fit.reshape(-1, d), held.reshape(-1, d)


def _settings(source: str, safety: SafetyConfig) -> dict:
    return json.loads(json.dumps({"source": source, "safety": to_dict(safety)}))


def _finished(run_dir: str, init_from: Optional[str], safety: SafetyConfig, log) -> bool:
    """Whether `run_dir` already holds this polytope (then say so); a polytope of other
    settings there is a one-line error."""
    record = load_safety_record(run_dir)
    if record is None:
        return False
    source = os.path.abspath(init_from) if init_from else record["source"]
    if _settings(source, safety) != record.get("settings"):
        raise UserError(f"{run_dir} already holds a polytope built with other settings "
                        f"(from {record['source']}); use a new --run-dir to build another")
    log(f"{run_dir} already holds the polytope for these settings "
        f"({os.path.join(run_dir, record['polytope'])}); nothing to do")
    return True


def _pct(x) -> str:
    return "?" if x is None else f"{100 * x:.1f} %"


def _summary(report: dict, log) -> None:
    w = report["windows"]
    log(f"safety: {report.get('fit_states', '?')} fit + {report.get('heldout_states', '?')} "
        f"held-out states from {w['windows_kept']} windows of {w['seq_len']} tokens "
        f"({w['windows_dropped_flagged']} of {w['windows_examined']} examined windows dropped "
        "for a flagged string)")
    log(f"safety: {report.get('anchors', '?')} anchors, {report.get('support_rows', '?')} "
        f"support rows, eps {report.get('eps', float('nan')):.4g}; held-out safe states "
        f"outside: {_pct(report.get('heldout_outside_after_eps'))} "
        f"(before eps {_pct(report.get('heldout_outside_before_eps'))}; target "
        f"{_pct(report.get('fp_target'))})")
    log(f"safety: {len(report['flagged'])} flagged string(s) -> "
        f"{report.get('flagged_rows', '?')} flagged token rows, logit cap "
        f"{report.get('flag_cap_logit', float('nan')):.3f} (fit states over it: "
        f"{_pct(report.get('fit_states_over_cap'))})")


def run_safety_stage(cfg: PerspectiveConfig, run_dir: str, init_from: Optional[str],
                     data: Optional[Sequence[str]] = None,
                     resume_from_step: Optional[int] = None, log=print) -> None:
    """Build the polytope of `init_from`'s model into `run_dir` (module docstring)."""
    if data:
        raise UserError(f"--stage {SAFETY_STAGE} reads safe text from --safe-data (default: "
                        "the source run's corpus), not --data")
    if resume_from_step is not None:
        raise UserError(f"--resume-from-step cannot be used with --stage {SAFETY_STAGE}: it "
                        "has no checkpoints")
    safety = effective_safety(cfg.safety)
    ensure_run_dir(run_dir)
    with hold_run_dir(run_dir):
        if _finished(run_dir, init_from, safety, log):
            return
        if not init_from:
            raise UserError(f"--stage {SAFETY_STAGE} needs --init-from ALIGN_RUN_DIR (an align "
                            "or ternary run)")
        src = _check_source(init_from, run_dir)
        with hold_run_dir(init_from, shared=True):      # no trainer writes it meanwhile
            _build(safety, src, run_dir, init_from, log)


def _check_source(init_from: str, run_dir: str) -> PerspectiveConfig:
    """The source run's config once it is not a safety run and `run_dir` is not a
    training run (one-line errors otherwise; `train.stages.run_stage` has checked that
    it holds an align or ternary model)."""
    if os.path.isdir(os.path.join(run_dir, CHECKPOINT_DIR)):
        raise UserError(f"--run-dir {run_dir} holds a training run; the safety stage writes "
                        "into a directory of its own (e.g. RUN/safety)")
    src = source_config(init_from)
    if load_safety_record(init_from) is not None:
        raise UserError(f"--init-from {init_from} is a safety run; pass the align or ternary "
                        "run it was built from")
    return src


def _build(safety: SafetyConfig, src: PerspectiveConfig, run_dir: str, init_from: str,
           log) -> None:
    source = os.path.abspath(init_from)
    step = latest_complete_step(init_from)
    if step is not None and step < src.train.steps:
        log(f"note: {init_from} is unfinished (checkpoint at step {step} of "
            f"{src.train.steps}); building the polytope of it as it is")
    tokenizer = load_tokenizer(init_from)
    appended = tokenizer.appended_bytes()
    rules = FlagRules.build(safety.flagged, appended)
    params = restore_params(init_from, abstract_params(src.model, src.moe))
    used = effective_params(src, params, src.train.steps)
    segments, described = _safe_segments(init_from, src, safety, tokenizer)
    seq_len = src.data.seq_len
    windows, counts = choose_windows(segments, seq_len, appended, rules.strings,
                                     max(2, math.ceil(safety.max_states / seq_len)),
                                     safety.seed)
    batch = max(1, src.train.batch_size // src.train.grad_accum)
    fit, held = split_states(collect_states(src, used, windows, batch), safety)
    head = np.asarray(used["embed"]["embedding"], np.float32)            # [V, d]
    poly, built = build_polytope(fit, held, head, rules, safety)
    poly = dataclasses.replace(poly, meta={**poly.meta, "source_run": source,
                                           "source_step": step})
    digest = write_polytope(os.path.join(run_dir, POLYTOPE_FILE), poly)
    report = {**built, "fp_target": safety.fp_target, "windows": counts,
              "source_run": source, "source_step": step, "safe_data": described,
              "flagged": list(safety.flagged), "flagged_tokens": int(rules.size),
              "polytope": POLYTOPE_FILE, "polytope_sha256": digest}
    atomic_write(os.path.join(run_dir, REPORT_FILE), json.dumps(report, indent=2))
    save_run_config(dataclasses.replace(src, safety=safety), run_dir)
    save_safety_record(run_dir, {"source": source, "source_step": step,
                                 "polytope": POLYTOPE_FILE, "polytope_sha256": digest,
                                 "settings": _settings(source, safety)})
    _summary(report, log)
    if not rules.size:
        log("note: no token of the tokenizer completes a flagged string; the polytope has "
            "no flagged rows")
    log(f"wrote {os.path.join(run_dir, POLYTOPE_FILE)}; export it with perspective-export "
        f"--run-dir {run_dir} --out MODEL_DIR")
