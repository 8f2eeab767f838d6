"""Fault injection against a tiny curriculum run and its exported model; prints a table.

    python tools/fault_inject.py [--kills 4] [--signals 4] [--flips 2] [--disk-full 2]
                                 [--seed 0] [--work DIR] [--json FILE]

A reference `perspective-train --stage all` run (tiny model, a slice of
TinyShakespeare, sentencepiece tokenizer), its continuation, its export and greedy
generations are made first. Then each trial injects one fault — kill -9 or
SIGINT/SIGTERM at a random moment of `--stage all`, one flipped byte in a file of the
run or model directory, a full filesystem under training or export, a malformed
input, two trainers on one directory — runs the command a user would run next and
compares what it did with the reference (`fault_trials` defines the outcomes).
Target: zero in the silent / lost / traceback columns. docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from fault_trials import (Trial, checkpoint_files, cli, copy_tree, flip_byte,
                          harmed, interrupted, judge_result, run, small_filesystem_prefix,
                          tree_digest)
from fault_cases import malformed_trials

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"model.vocab_size": 320, "model.d_model": 32, "model.n_layers": 4, "model.d_ff": 64,
        "model.pdr_rank": 8, "model.n_heads": 2, "model.n_kv_heads": 2, "model.head_dim": 16,
        "model.window": 16, "data.seq_len": 32, "train.batch_size": 8, "train.steps": 8,
        "train.warmup_steps": 2, "train.eval_every": 4, "train.eval_batches": 1,
        "train.log_every": 1, "checkpoint.every": 2, "checkpoint.keep": 10}
PROMPT = "ROMEO:"
GROUPS = ("kill", "signal", "flip-run", "flip-model", "flip-export", "disk-full", "concurrent",
          "malformed")


class Bench:
    """The reference artefacts and the commands every trial reuses."""

    def __init__(self, work: str, data: str, rng: random.Random):
        self.work, self.data, self.rng = work, data, rng

    def overrides(self, **extra) -> list[str]:
        return [f"{k}={v}" for k, v in {**TINY, **extra}.items()]

    def train(self, stage: str, run_dir: str, **extra) -> list[str]:
        return cli("train", "--stage", stage, "--run-dir", run_dir, "--data", self.data,
                   "--config", os.path.join(REPO, "curricula", "tiny.yaml"), "--no-progress",
                   *self.overrides(**extra))

    def infer(self, model: str, *extra) -> list[str]:
        return cli("infer", "--model-dir", model, PROMPT, "--max-tokens", "16",
                   "--temperature", "0", *extra)

    def fingerprint(self, run_dir: str) -> dict:
        """{stage: sha256 of its latest checkpoint's parameters}; {} if unreadable."""
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--fingerprint",
                            run_dir], capture_output=True, text=True)
        return json.loads(p.stdout) if p.returncode == 0 and p.stdout.strip() else {}

    SAVED = ("stage_all_s", "f_all", "f_dense10", "model_files", "text", "cont")

    def build_reference(self) -> None:
        """Make the reference artefacts, or reuse those of an earlier call on this --work."""
        w = self.work
        self.cur = os.path.join(w, "ref", "cur")
        self.dense_more = os.path.join(w, "ref", "dense10")
        self.model = os.path.join(w, "ref", "model")
        self.state = os.path.join(w, "ref", "c.state")
        record = os.path.join(w, "ref", "reference.json")
        if os.path.exists(record):
            with open(record) as fh:
                self.__dict__.update(json.load(fh))
            return
        t0 = time.perf_counter()
        must(run(self.train("all", self.cur)), "reference --stage all")
        self.stage_all_s = time.perf_counter() - t0
        self.f_all = self.fingerprint(self.cur)
        copy_tree(os.path.join(self.cur, "dense"), self.dense_more)
        must(run(self.train("dense", self.dense_more, **{"train.steps": 10})),
             "reference dense continuation")
        self.f_dense10 = self.fingerprint(self.dense_more)
        must(run(cli("export", "--run-dir", self.cur, "--out", self.model)), "export")
        self.model_files = tree_digest(self.model, skip=("manifest.json",))
        self.text = must(run(self.infer(self.model, "--save-state", self.state)), "infer").out
        self.cont = must(run(cli("infer", "--model-dir", self.model, "--resume-state",
                                 self.state, "--max-tokens", "8", "--temperature", "0")),
                         "infer --resume-state").out
        if not (self.f_all and self.f_dense10):
            sys.exit("error: cannot fingerprint the reference checkpoints")
        with open(record, "w") as fh:
            json.dump({k: getattr(self, k) for k in self.SAVED}, fh)


def must(proc, what: str):
    if proc.rc != 0:
        sys.exit(f"error: the fault-free {what} failed (exit {proc.rc}): "
                 f"{(proc.err.strip().splitlines() or ['?'])[-1]}")
    return proc


def interrupt_trials(b: Bench, n: int, sig: int, label: str) -> list[Trial]:
    """Interrupt `--stage all` at random moments, re-run it to the end, compare."""
    trials = []
    for i in range(n):
        cur = os.path.join(b.work, f"{label}{i}", "cur")
        shutil.rmtree(os.path.dirname(cur), ignore_errors=True)   # a fresh run every call
        after = b.rng.uniform(0.5, b.stage_all_s)
        proc, latency = interrupted(b.train("all", cur), after, sig)
        kind = f"{'kill -9' if sig == signal.SIGKILL else signal.Signals(sig).name} " \
               "during --stage all"
        if sig != signal.SIGKILL:
            first = judge_result(kind, proc, None)
            if first.outcome != "clean" or (proc.rc not in (0, 130)):
                trials.append(first if first.outcome != "clean" else
                              Trial(kind, "other", f"exit {proc.rc} after the signal"))
                continue
            if latency > 10:
                trials.append(Trial(kind, "other", f"took {latency:.0f}s to stop"))
                continue
        again = run(b.train("all", cur))
        same = b.fingerprint(cur) == b.f_all if again.rc == 0 else None
        t = judge_result(kind, again, same)
        if t.outcome == "clean" and again.rc != 0:   # the rerun refused: the run is lost
            t = Trial(kind, "lost", f"rerun after the fault at {after:.1f}s: {t.detail}")
        t.detail = f"at {after:.1f}s (stopped in {latency:.1f}s): {t.detail}"
        trials.append(t)
    return trials


def run_dir_kind(rel: str) -> str:
    parts = rel.split(os.sep)
    if parts[0] == "checkpoints":
        if len(parts) > 2 and parts[2] == "state":
            return "checkpoint arrays" if "d" in parts[3:-1] else "checkpoint array metadata"
        if len(parts) > 2 and parts[2] in ("data_iter", "meta"):
            return f"checkpoint {parts[2]}"
        return "checkpoint bookkeeping"
    if parts[0] == "data":
        return "token store"
    if parts[0].startswith("tokenizer"):
        return "tokenizer (run)"
    return {"config.yaml": "run config", "data.json": "data record",
            "metrics.jsonl": "metrics log"}.get(parts[0], "other run file")


def flip_run_trials(b: Bench, n: int) -> list[Trial]:
    """Flip a byte in each kind of file of a finished dense run, then resume it."""
    src = os.path.join(b.cur, "dense")
    latest = max(int(s) for s in os.listdir(os.path.join(src, "checkpoints")) if s.isdigit())
    kinds: dict[str, list[str]] = {}
    for rel in tree_digest(src):
        if rel.startswith("checkpoints") and rel.split(os.sep)[1] not in (str(latest),) \
                and rel.split(os.sep)[1].isdigit():
            continue                               # older steps stay for recovery
        if rel.startswith("tb") or ".lock" in rel or not os.path.getsize(os.path.join(src, rel)):
            continue
        kinds.setdefault(run_dir_kind(rel), []).append(rel)
    trials = []
    for kind in sorted(kinds):
        for i in range(n):
            trial = copy_tree(src, os.path.join(b.work, "flip", f"{kind}{i}".replace(" ", "_")))
            rel = b.rng.choice(sorted(kinds[kind]))
            flip_byte(os.path.join(trial, rel), b.rng)
            before = checkpoint_files(trial)
            proc = run(b.train("dense", trial, **{"train.steps": 10}))
            same = b.fingerprint(trial).get("") == b.f_dense10.get("") if proc.rc == 0 else None
            lost = harmed(before, checkpoint_files(trial), rel) if proc.rc != 0 else []
            t = judge_result(f"byte flip: {kind}", proc, same, lost)
            t.detail = f"{rel}: {t.detail}"
            trials.append(t)
    return trials


def flip_model_trials(b: Bench, n: int) -> list[Trial]:
    """Flip a byte in each kind of model-directory file, or in a saved conversation,
    and generate; plus one edited digit of the manifest's config."""
    kinds: dict[str, list[str]] = {}
    for rel in tree_digest(b.model):
        if not os.path.getsize(os.path.join(b.model, rel)):
            continue
        name = os.path.basename(rel)
        kind = ("manifest" if name == "manifest.json" else "tokenizer (model)"
                if name.startswith("tokenizer") else "experts" if "expert" in rel
                else "shared weights" if name.startswith("shared") else "other model file")
        kinds.setdefault(kind, []).append(rel)
    trials = []
    for kind in sorted(kinds):
        for i in range(n):
            model = copy_tree(b.model, os.path.join(b.work, "mflip", f"{kind}{i}".replace(" ", "_")))
            rel = b.rng.choice(sorted(kinds[kind]))
            flip_byte(os.path.join(model, rel), b.rng)
            proc = run(b.infer(model))
            t = judge_result(f"byte flip: {kind}", proc, proc.out == b.text)
            t.detail = f"{rel}: {t.detail}"
            trials.append(t)
    for key, edit in (("norm_eps", lambda v: 0.5), ("window", lambda v: 4)):
        model = copy_tree(b.model, os.path.join(b.work, "medit", key))
        path = os.path.join(model, "manifest.json")
        with open(path) as fh:
            manifest = json.load(fh)
        manifest["config"]["model"][key] = edit(manifest["config"]["model"][key])
        with open(path, "w") as fh:
            json.dump(manifest, fh, indent=1)
        proc = run(b.infer(model))
        trials.append(judge_result(f"edited manifest config ({key})", proc, proc.out == b.text))
    for i in range(n * 2):
        state = os.path.join(b.work, f"state{i}")
        with open(b.state, "rb") as src, open(state, "wb") as dst:
            dst.write(src.read())
        flip_byte(state, b.rng)
        proc = run(cli("infer", "--model-dir", b.model, "--resume-state", state,
                       "--max-tokens", "8", "--temperature", "0"))
        trials.append(judge_result("byte flip: conversation state", proc, proc.out == b.cont))
    return trials


def export_flip_trials(b: Bench, n: int) -> list[Trial]:
    """Flip a byte in the last stage's checkpoint arrays, then export."""
    trials = []
    for i in range(n):
        cur = copy_tree(b.cur, os.path.join(b.work, "eflip", str(i), "cur"))
        files = sorted(r for r in tree_digest(os.path.join(cur, "align"))
                       if run_dir_kind(r) == "checkpoint arrays")
        rel = b.rng.choice(files)
        flip_byte(os.path.join(cur, "align", rel), b.rng)
        out = os.path.join(b.work, "eflip", str(i), "model")
        proc = run(cli("export", "--run-dir", cur, "--out", out))
        same = (tree_digest(out, skip=("manifest.json",)) == b.model_files
                if proc.rc == 0 else None)
        trials.append(judge_result("byte flip: checkpoint read by export", proc, same))
    return trials


def disk_full_trials(b: Bench, n: int) -> list[Trial]:
    """Training and export on a filesystem too small to finish; the run must stop with
    one line and resume exactly on a larger disk."""
    dense_kb = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in
                   os.walk(os.path.join(b.cur, "dense")) for f in fs) // 1024
    trials = []
    for i in range(n):
        mount = os.path.join(b.work, "full", f"mnt{i}")
        saved = os.path.join(b.work, "full", f"saved{i}")
        shutil.rmtree(saved, ignore_errors=True)
        size = max(64, int(dense_kb * b.rng.uniform(0.2, 0.9)))
        prefix = small_filesystem_prefix(mount, size, saved)
        if prefix is None:
            return [Trial("disk full", "other", "no private mounts here: not measured")]
        run_dir = os.path.join(mount, "run")
        proc = run(prefix + b.train("dense", run_dir))
        kind = "disk full: training"
        if proc.rc == 0:
            trials.append(Trial(kind, "clean", f"fit in {size} KB"))
            continue
        first = judge_result(kind, proc, None)
        if first.outcome != "clean":
            trials.append(first)
            continue
        moved = os.path.join(saved, "run")
        again = run(b.train("dense", moved))
        same = b.fingerprint(moved).get("") == b.f_all.get("dense") if again.rc == 0 else None
        t = judge_result(kind, again, same)
        if again.rc != 0:
            t = Trial(kind, "lost", f"resume after disk full failed: {t.detail}")
        t.detail = f"{size} KB: {first.detail[:80]} → resumed: {t.detail[:60]}"
        trials.append(t)
    model_kb = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(b.model)
                   for f in fs) // 1024
    for skip in (False, True):      # refused up front; or past the check, mid-write
        kind = "disk full: export" + (" (--skip-space-check)" if skip else "")
        tag = "_skip" if skip else ""
        mount = os.path.join(b.work, "full", f"mnt_export{tag}")
        saved = os.path.join(b.work, "full", f"saved_export{tag}")
        shutil.rmtree(saved, ignore_errors=True)
        prefix = small_filesystem_prefix(mount, max(16, model_kb // 2), saved)
        if prefix is None:
            break
        proc = run(prefix + cli("export", "--run-dir", b.cur, "--out",
                                os.path.join(mount, "model"),
                                *(["--skip-space-check"] if skip else [])))
        t = judge_result(kind, proc, None)
        if proc.rc == 0:
            t = Trial(kind, "silent", "export claimed success on a full disk")
        elif t.outcome == "clean":   # what is left must not pass for a model directory
            left = run(b.infer(os.path.join(saved, "model")))
            if left.rc == 0:
                t = Trial(kind, "silent", "the partial export loads")
        trials.append(t)
    return trials


def concurrent_trial(b: Bench) -> list[Trial]:
    """Two trainers on one run directory: the second must be refused, the first finish."""
    run_dir = os.path.join(b.work, "twice")
    shutil.rmtree(run_dir, ignore_errors=True)
    first = subprocess.Popen(b.train("dense", run_dir), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    second = run(b.train("dense", run_dir), timeout_s=300)
    out, err = first.communicate(timeout=900)
    kind = "two trainers on one run dir"
    if second.rc == 0:
        return [Trial(kind, "silent", "the second trainer ran too")]
    t = judge_result(kind, second, None)
    if t.outcome == "clean" and first.returncode != 0:
        t = Trial(kind, "lost", f"the first trainer failed: {err.strip()[-120:]}")
    return [t]


def table(trials: list[Trial]) -> str:
    cols = ("trials", "clean", "silent change", "data lost", "traceback", "other")
    rows = {}
    for t in trials:
        row = rows.setdefault(t.kind, dict.fromkeys(cols, 0))
        row["trials"] += 1
        row[{"clean": "clean", "silent": "silent change", "lost": "data lost",
             "traceback": "traceback"}.get(t.outcome, "other")] += 1
    total = {c: sum(r[c] for r in rows.values()) for c in cols}
    width = max(len(k) for k in list(rows) + ["fault"])
    lines = [f"| {'fault':<{width}} | " + " | ".join(cols) + " |",
             f"|{'-' * (width + 2)}|" + "|".join("-" * (len(c) + 2) for c in cols) + "|"]
    for kind, row in list(rows.items()) + [("**total**", total)]:
        lines.append(f"| {kind:<{width}} | " + " | ".join(f"{row[c]:>{len(c)}}" for c in cols)
                     + " |")
    return "\n".join(lines)


def fingerprint_main(run_dir: str) -> None:
    """Print {stage: sha256 of the latest checkpoint's params} for a run or curriculum."""
    import hashlib

    import jax
    import numpy as np

    from perspective_jax.model.transformer import abstract_params
    from perspective_jax.rundir.checkpoint import restore_params
    from perspective_jax.rundir.layout import has_config, load_run_config

    stages = {"": run_dir} if has_config(run_dir) else {
        s: os.path.join(run_dir, s) for s in sorted(os.listdir(run_dir))
        if has_config(os.path.join(run_dir, s))}
    out = {}
    for name, path in stages.items():
        cfg = load_run_config(path)
        params = restore_params(path, abstract_params(cfg.model, cfg.moe))
        h = hashlib.sha256()
        for leaf in jax.tree.leaves(params):
            h.update(np.asarray(leaf).tobytes())
        out[name] = h.hexdigest()
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=4, help="kill -9 trials")
    p.add_argument("--signals", type=int, default=4, help="SIGINT (and SIGTERM) trials")
    p.add_argument("--flips", type=int, default=1, help="byte flips per file kind")
    p.add_argument("--disk-full", type=int, default=2, help="disk-full training trials")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data",
                                                  "tinyshakespeare.txt"))
    p.add_argument("--work", help="working directory (default: a temporary one)")
    p.add_argument("--json", help="also write every trial as JSON here")
    p.add_argument("--groups", default=",".join(GROUPS),
                   help=f"which trials, comma-separated from {','.join(GROUPS)}")
    p.add_argument("--fingerprint", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.fingerprint:
        return fingerprint_main(args.fingerprint)
    if not os.path.isfile(args.data):
        sys.exit(f"error: corpus {args.data} not found; pass --data FILE")
    work = args.work or tempfile.mkdtemp(prefix="perspective-faults-")
    os.makedirs(work, exist_ok=True)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(work, "xla-cache"))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    data = os.path.join(work, "corpus.txt")
    with open(args.data, encoding="utf-8") as src, open(data, "w", encoding="utf-8") as dst:
        dst.write(src.read()[:150_000])
    b = Bench(work, data, random.Random(args.seed))
    t0 = time.perf_counter()
    b.build_reference()
    print(f"reference: --stage all in {b.stage_all_s:.0f}s; work dir {work}", flush=True)
    groups = {"kill": lambda: interrupt_trials(b, args.kills, signal.SIGKILL, "kill"),
              "signal": lambda: (
                  interrupt_trials(b, args.signals - args.signals // 2, signal.SIGINT, "int")
                  + interrupt_trials(b, args.signals // 2, signal.SIGTERM, "term")),
              "flip-run": lambda: flip_run_trials(b, args.flips),
              "flip-model": lambda: flip_model_trials(b, args.flips),
              "flip-export": lambda: export_flip_trials(b, args.flips),
              "disk-full": lambda: disk_full_trials(b, args.disk_full),
              "concurrent": lambda: concurrent_trial(b),
              "malformed": lambda: malformed_trials(b)}
    chosen = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = sorted(set(chosen) - set(groups))
    if unknown:
        sys.exit(f"error: unknown --groups {unknown}; choose from {','.join(GROUPS)}")
    trials: list[Trial] = []
    for name in chosen:
        got = groups[name]()
        trials += got
        for t in got:
            print(f"  {t.outcome:<9} {t.kind}: {t.detail}", flush=True)
    print(f"\n{len(trials)} trials in {time.perf_counter() - t0:.0f}s (seed {args.seed})\n")
    print(table(trials))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([t.__dict__ for t in trials], fh, indent=1)
    bad = [t for t in trials if t.outcome not in ("clean",)]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
