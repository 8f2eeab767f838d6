"""Malformed inputs for `tools/fault_inject.py`: each must be refused with one line
(or, where marked, accepted and reported), never a traceback or a silent guess."""

from __future__ import annotations

import os
import shutil

from fault_trials import Trial, cli, copy_tree, judge_result, run


def _write(path: str, data) -> str:
    with open(path, "wb" if isinstance(data, bytes) else "w") as fh:
        fh.write(data)
    return path


def _inputs(b) -> dict[str, str]:
    """The malformed files, made once in the work directory."""
    d = os.path.join(b.work, "malformed")
    os.makedirs(d, exist_ok=True)
    with open(b.data, encoding="utf-8") as fh:
        text = fh.read()[:60_000]
    rows = "\n".join(f"{i},{(i * 7919) % 1000},{(i * 104729) % 97}" for i in range(6000))
    model_bad_utf8 = copy_tree(b.model, os.path.join(d, "model_not_utf8"))
    path = os.path.join(model_bad_utf8, "manifest.json")
    raw = open(path, "rb").read()
    _write(path, raw.replace(b'"source_run"', b'"source_\xff\xferun"', 1))
    return {
        "binary": _write(os.path.join(d, "blob.bin"), os.urandom(50_000) + b"\0" * 100),
        "latin1": _write(os.path.join(d, "latin1.txt"),
                         text.encode("utf-8") + "café crème, señor\n".encode("latin-1") * 50),
        "csv": _write(os.path.join(d, "numbers.csv"), rows),
        "dup_yaml": _write(os.path.join(d, "dup.yaml"),
                           "model:\n  d_model: 32\n  d_model: 64\n"),
        "empty_yaml": _write(os.path.join(d, "empty.yaml"), ""),
        "text_state": _write(os.path.join(d, "not_a_state"), "hello\n"),
        "model_not_utf8": model_bad_utf8,
        "empty_run": os.path.join(d, "empty_run"),
    }


def malformed_trials(b) -> list[Trial]:
    f = _inputs(b)
    os.makedirs(f["empty_run"], exist_ok=True)    # a run that never saved a checkpoint
    with open(os.path.join(b.cur, "dense", "config.yaml"), "rb") as fh:
        _write(os.path.join(f["empty_run"], "config.yaml"), fh.read())
    r = os.path.join(b.work, "malformed", "runs")
    shutil.rmtree(r, ignore_errors=True)          # every case starts from nothing

    def train(name, *extra, **over):
        return b.train("dense", os.path.join(r, name), **over) + list(extra)
    cases = [  # (what, argv, expect "error" | "ok", text stderr must contain)
        ("binary --data only", _with_data(train("bin"), f["binary"]), "error", "blob.bin"),
        ("non-UTF-8 --data", _with_data(train("latin", **{"train.steps": 2}), f["latin1"]),
         "ok", "latin1.txt"),
        ("duplicate YAML key", train("dup", "--config", f["dup_yaml"]), "error", "d_model"),
        ("empty config file", train("empty", "--config", f["empty_yaml"]), "error", "empty"),
        ("model.d_model=1e9", train("big1", **{"model.d_model": 1_000_000_000}), "error", ""),
        ("model.n_layers=1e6", train("big2", **{"model.n_layers": 1_000_000}), "error", ""),
        ("model.vocab_size=1e7", train("big3", **{"model.vocab_size": 10_000_000}), "error", ""),
        ("train.batch_size=1e6", train("big4", **{"train.batch_size": 1_000_000}), "error", ""),
        ("small-vocabulary corpus (numeric CSV)",
         _with_data(train("csv", **{"train.steps": 2, "train.eval_every": 1}), f["csv"]),
         "ok", ""),
        ("export of a run without checkpoints",
         cli("export", "--run-dir", f["empty_run"], "--out", os.path.join(r, "m")), "error", ""),
        ("--temperature -1", b.infer(b.model, "--temperature", "-1"), "error", "temperature"),
        ("--top-p 2", b.infer(b.model, "--top-p", "2"), "error", "top"),
        ("--max-tokens -5", b.infer(b.model, "--max-tokens", "-5"), "error", "max-tokens"),
        ("--host-budget-mb 1e308", b.infer(b.model, "--host-budget-mb", "1e308"), "error",
         "host-budget-mb"),
        ("--top-k 0", b.infer(b.model, "--top-k", "0", "--temperature", "1"), "ok", ""),
        ("manifest not UTF-8", b.infer(f["model_not_utf8"]), "error", "manifest"),
        ("a text file as --resume-state",
         cli("infer", "--model-dir", b.model, "--resume-state", f["text_state"]), "error",
         "not_a_state"),
    ]
    trials = []
    for what, argv, expect, must_name in cases:
        proc = run(argv, timeout_s=600)
        kind = "malformed input"
        t = judge_result(kind, proc, None)
        if t.outcome == "clean":
            if expect == "error" and proc.rc == 0:
                t = Trial(kind, "silent", f"{what}: accepted")
            elif expect == "ok" and proc.rc != 0:
                t = Trial(kind, "other", f"{what}: refused a valid input ({t.detail})")
            elif must_name and must_name not in proc.err:
                t = Trial(kind, "other", f"{what}: the message does not name {must_name!r}: "
                                         f"{proc.err.strip()[-120:]}")
            elif what.startswith("export") and "--init-from" in proc.err:
                t = Trial(kind, "other", f"{what}: blames --init-from")
            else:
                t.detail = f"{what}: {t.detail}"
        else:
            t.detail = f"{what}: {t.detail}"
        trials.append(t)
    return trials


def _with_data(argv: list[str], path: str) -> list[str]:
    """`argv` with its --data replaced by `path`."""
    i = argv.index("--data")
    return argv[:i + 1] + [path] + argv[i + 2:]

