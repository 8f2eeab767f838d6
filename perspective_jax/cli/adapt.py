"""perspective-adapt: adapt an exported model to a text by forward gradients (SPEC §3.8).

    perspective-adapt --model-dir models/tiny --data notes.txt --out notes.adapter
    perspective-adapt --model-dir M --data a.txt b.txt --out A --epochs 3 --nes --json run.json
    perspective-infer --model-dir M --adapter notes.adapter "Dear diary,"

The text files (UTF-8) are tokenized with the model's tokenizer and cut into
non-overlapping windows of --seq-len + 1 tokens; --heldout windows are drawn for
the rails and --examples others, disjoint from them, for training (seeded by
--seed). Each of --epochs rounds is one pass over the training windows in batches
of --batch (one update per batch: `adapt.loop.Adaptation.step` on the streaming
engine), judged by the rails on the held-out windows — held-out loss and MPD's
agreement — and rolled back when it went off them. The adapters (and, with --nes,
the adapted expert coordinates) are written atomically to --out, tied to the model.

Also here: what `perspective-infer --adapt-online` uses — one adaptation round on a
prompt's text (`adapt_online`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Iterable, Optional

import numpy as np

from perspective_jax.cli import compile_cache
from perspective_jax.cli.common import (OneLineParser, add_engine_flags, check_output_file,
                                        cli_entry, engine_options_from_args, exit_with,
                                        float_in, int_in)
from perspective_jax.config.choices import ADAPT_OPTIMIZERS, FG_ESTIMATORS
from perspective_jax.errors import UserError
from perspective_jax.model import footprint


def _parser() -> argparse.ArgumentParser:
    from perspective_jax.adapt.loop import AdaptConfig
    from perspective_jax.adapt.nes import NESConfig
    d, n = AdaptConfig(), NESConfig()
    p = OneLineParser(prog="perspective-adapt", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True, help="directory written by perspective-export")
    p.add_argument("--data", required=True, nargs="+", metavar="TEXT",
                   help="UTF-8 text file(s) to adapt to")
    p.add_argument("--out", required=True, metavar="ADAPTER", help="adapter file to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--json", metavar="FILE", help="also write the rounds and summary as JSON")
    w = p.add_argument_group("windows and rounds")
    w.add_argument("--seq-len", type=int_in(1, 65536), default=128,
                   help="tokens a window predicts (a window holds one more)")
    w.add_argument("--examples", type=int_in(1), default=100, help="training windows")
    w.add_argument("--heldout", type=int_in(1), default=16,
                   help="held-out windows the rails judge each round on")
    w.add_argument("--epochs", type=int_in(1), default=10,
                   help="rounds, each one pass over the training windows")
    w.add_argument("--batch", type=int_in(1), default=10, help="windows per update")
    w.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0,
                   help="draws the windows, their order and the directions")
    u = p.add_argument_group("the update (forward gradients on LoRA adapters of W_p)")
    u.add_argument("--rank", type=int_in(1, 1024), default=d.rank)
    u.add_argument("--directions", type=int_in(1, 4096), default=d.directions,
                   help="tangent directions K per update (K forward-mode derivatives)")
    u.add_argument("--estimator", choices=FG_ESTIMATORS, default=d.estimator)
    u.add_argument("--optimizer", choices=ADAPT_OPTIMIZERS, default=d.optimizer)
    u.add_argument("--lr", type=float_in(0.0, 10.0, open_low=True), default=d.lr)
    e = p.add_argument_group("NES on the routed layers' expert coordinates")
    e.add_argument("--nes", action="store_true", help="also adapt the expert coordinates")
    e.add_argument("--nes-population", type=int_in(2, 4096), default=n.population,
                   help="perturbations per update (even: antithetic pairs)")
    e.add_argument("--nes-sigma", type=float_in(0.0, 0.5, open_low=True), default=n.sigma)
    e.add_argument("--nes-lr", type=float_in(0.0, 1.0, open_low=True), default=n.lr)
    add_engine_flags(p)
    compile_cache.add_flag(p)
    p.add_argument("--allow-oversize", action="store_true", help=footprint.OVERRIDE_HELP)
    return p


def adapt_config_from_args(a: argparse.Namespace):
    from perspective_jax.adapt.loop import AdaptConfig
    from perspective_jax.adapt.nes import NESConfig
    nes = (NESConfig(population=a.nes_population, sigma=a.nes_sigma, lr=a.nes_lr)
           if a.nes else None)
    return AdaptConfig(rank=a.rank, directions=a.directions, estimator=a.estimator,
                       optimizer=a.optimizer, lr=a.lr, nes=nes, seed=a.seed)


# ---------------------------------------------------------------------- windows
def read_text(path: str) -> str:
    """A data file's text: it must exist, be readable, UTF-8 and not empty."""
    if os.path.isdir(path):
        raise UserError(f"--data {path} is a directory; give a text file")
    if not os.path.exists(path):
        raise UserError(f"--data {path}: no such file")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise UserError(f"--data {path}: cannot be read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--data {path} is not UTF-8 text (byte {raw[e.start]:#04x} at "
                        f"offset {e.start})") from None
    if not text.strip():
        raise UserError(f"--data {path} is empty")
    return text


def windows_of(ids, length: int) -> np.ndarray:
    """[N, length] the non-overlapping windows ids[k·length : (k+1)·length] (the tail
    shorter than a window is left out)."""
    ids = np.asarray(ids, np.int32).reshape(-1)
    n = ids.size // length
    return ids[: n * length].reshape(n, length)


def draw_windows(token_lists: list, seq_len: int, examples: int, heldout: int,
                 seed: int, names: Optional[list] = None) -> tuple[np.ndarray, np.ndarray]:
    """(training [examples, seq_len+1], held-out [heldout, seq_len+1]): disjoint draws
    (permutation seeded by `seed`) from the non-overlapping windows of every text."""
    length = seq_len + 1
    pool = []
    for i, ids in enumerate(token_lists):
        got = windows_of(ids, length)
        if not len(got):
            name = names[i] if names else f"text {i}"
            raise UserError(f"--data {name} is too short for one window: it has "
                            f"{len(ids)} tokens, a window {length} (--seq-len + 1); lower "
                            "--seq-len or give more text")
        pool.append(got)
    pool = np.concatenate(pool)
    if len(pool) < examples + heldout:
        raise UserError(f"the data has {len(pool)} windows of {length} tokens; --examples "
                        f"{examples} + --heldout {heldout} need {examples + heldout}: lower "
                        "them or --seq-len, or give more text")
    order = np.random.default_rng(seed).permutation(len(pool))
    return pool[order[heldout: heldout + examples]], pool[order[:heldout]]


def epoch_batches(train: np.ndarray, batch: int, rng: np.random.Generator) -> list:
    """One pass over the training windows in a fresh order, `batch` windows a batch."""
    order = rng.permutation(len(train))
    return [train[order[s: s + batch]] for s in range(0, len(train), batch)]


# ---------------------------------------------------------------------- rounds
def run_rounds(run, rounds: Iterable[list], heldout: np.ndarray,
               on_round: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Rails on `heldout` (baselines now), then `run.round(batches, …)` for each entry
    of `rounds`. The held-out loss and agreement reported for a round are those of
    the state kept after it (a rolled-back round: the state before it). Returns the
    rounds and the summary (loss before → after, updates, seconds, rollbacks)."""
    rails = run.rails(heldout)
    before, agree0 = rails.baseline_loss, rails.baseline_agreement
    loss, agree, out = before, agree0, []
    for i, batches in enumerate(rounds):
        r = run.round(batches, heldout, rails)
        if r["rolled_back"] is None:
            loss, agree = r["heldout_loss"], r["agreement"]
        row = {"round": i + 1, "train_loss": r["train_loss"], "heldout_loss": loss,
               "agreement": agree, "rolled_back": r["rolled_back"]}
        out.append(row)
        if on_round is not None:
            on_round(i, row)
    return {"rounds": out, "heldout_loss_before": before, "heldout_loss_after": loss,
            "reduction": before - loss, "agreement_before": agree0, "agreement_after": agree,
            "updates": run.updates, "update_s": run.update_s,
            "mean_update_s": run.update_s / run.updates if run.updates else 0.0,
            "rollbacks": list(run.rollbacks)}


def round_line(row: dict, n: int) -> str:
    line = (f"round {row['round']}/{n}: train loss {row['train_loss']:.4f}, held-out loss "
            f"{row['heldout_loss']:.4f}, MPD agreement {row['agreement']:.3f}")
    return line + (f", rolled back: {row['rolled_back']}" if row["rolled_back"] else "")


def summary_line(s: dict) -> str:
    return (f"held-out loss {s['heldout_loss_before']:.4f} -> {s['heldout_loss_after']:.4f} "
            f"(reduction {s['reduction']:.4f}); {s['updates']} updates, "
            f"{s['mean_update_s']:.3f} s per update; {len(s['rollbacks'])} rollbacks")


def save_run(path: str, run, identity: str) -> None:
    """The run's adapters (and its coordinates when it has any) to `path`, atomically."""
    from perspective_jax.adapt.adapter_file import AdapterSpec, save_adapters
    c = run.cfg
    import jax
    save_adapters(path, jax.tree.map(np.asarray, run.lora), identity,
                  AdapterSpec(c.rank, c.targets, c.scale),
                  coords={k: np.asarray(v) for k, v in run.coords.items()} if run.coords
                  else None)


@cli_entry
def run(argv=None) -> int:
    a = _parser().parse_args(argv)
    cfg = adapt_config_from_args(a)
    for flag, path in (("--out", a.out), ("--json", a.json)):
        if path:
            check_output_file(path, flag)
    if os.path.exists(a.out) and not a.force:
        raise UserError(f"--out {a.out} exists; pass --force to replace it")
    texts = [read_text(path) for path in a.data]
    from perspective_jax.adapt.loop import Adaptation
    from perspective_jax.adapt.target import StreamedTarget
    from perspective_jax.infer.engine import StreamingEngine, load_model_tokenizer
    from perspective_jax.modeldir.manifest import read_manifest

    manifest = read_manifest(a.model_dir)
    footprint.refuse_oversize_engine(manifest, a.host_budget_mb, a.device_slots,
                                     a.prefill_chunk, a.allow_oversize)
    tokenizer = load_model_tokenizer(a.model_dir, manifest)
    train, held = draw_windows([tokenizer.encode(t) for t in texts], a.seq_len, a.examples,
                               a.heldout, a.seed, names=a.data)
    compile_cache.enable(a.compilation_cache)
    engine = StreamingEngine(a.model_dir, engine_options_from_args(a), manifest=manifest)
    try:
        adaptation = Adaptation(StreamedTarget(engine, cfg.scale), cfg)
        rng = np.random.default_rng([a.seed, 1])
        rounds = (epoch_batches(train, a.batch, rng) for _ in range(a.epochs))
        summary = run_rounds(adaptation, rounds, held, lambda i, row: (
            print(round_line(row, a.epochs)), sys.stdout.flush()))
        save_run(a.out, adaptation, engine.identity)
    finally:
        engine.close()
    print(summary_line(summary))
    print(f"wrote {a.out}")
    if a.json:
        summary = {"adapter": a.out, "windows": {"train": len(train), "heldout": len(held),
                                                 "tokens": a.seq_len + 1},
                   "config": {"rank": cfg.rank, "directions": cfg.directions,
                              "estimator": cfg.estimator, "optimizer": cfg.optimizer,
                              "lr": cfg.lr, "nes": cfg.nes is not None, "seed": cfg.seed},
                   **summary}
        with open(a.json, "w") as fh:
            json.dump(summary, fh, indent=1)
    return 0


# ------------------------------------------------- perspective-infer --adapt-online
def adapt_online(engine, path: str, adapter, ids, seq_len: int, cfg, batch: int = 10) -> dict:
    """One adaptation round on a prompt's token ids, saved back to `path` (atomically).

    `adapter`: the AttachedAdapter in use, or None (a fresh one is started: B = 0, the
    plain model). Windows of min(seq_len, len − 1) + 1 tokens, non-overlapping; with
    two or more the last is held out and the rails judge the round on it, with one
    the update runs without rails. `cfg`: AdaptConfig (rank, targets and scale are
    the file's). Returns the --stats block."""
    from perspective_jax.adapt.loop import Adaptation
    from perspective_jax.adapt.target import StreamedTarget
    ids = np.asarray(ids, np.int32).reshape(-1)
    if ids.size < 2:
        return {"skipped": f"the prompt has {ids.size} token(s); a window needs 2"}
    wins = windows_of(ids, min(seq_len, ids.size - 1) + 1)
    run = Adaptation(StreamedTarget(engine, cfg.scale), cfg,
                     lora=None if adapter is None else adapter.lora,
                     coords=None if adapter is None else (adapter.coords or None))
    if len(wins) >= 2:
        train, held = wins[:-1], wins[-1:]
        s = run_rounds(run, [[train[i: i + batch] for i in range(0, len(train), batch)]], held)
        block = {"windows": {"train": len(train), "heldout": 1, "tokens": wins.shape[1]},
                 "updates": s["updates"], "seconds": round(s["update_s"], 4),
                 "heldout_loss_before": s["heldout_loss_before"],
                 "heldout_loss_after": s["heldout_loss_after"],
                 "rolled_back": s["rounds"][0]["rolled_back"]}
    else:
        before = run.step(wins)
        block = {"windows": {"train": 1, "heldout": 0, "tokens": wins.shape[1]},
                 "updates": run.updates, "seconds": round(run.update_s, 4),
                 "rails": "skipped: the prompt has one window, none to hold out",
                 "train_loss_before": before,
                 "train_loss_after": run.target.loss(wins, run.lora, run.coords)}
    save_run(path, run, engine.identity)
    block["adapter"] = path
    return block


main = exit_with(run)


if __name__ == "__main__":
    main()
