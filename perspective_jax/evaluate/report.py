"""What `perspective-eval` writes: the metrics table (terminal and Markdown), a JSON
report, and the pictures — reliability diagrams and risk–coverage curves.

    rows = metric_rows(values, verdicts)         # [(metric, value, unit, gate, result)]
    rows = harness_rows(lm_eval)                 # [(task, metric, value, stderr)]
    text_table(rows, HARNESS_HEAD)
    write_report(out_dir, header, values, verdicts, confidences, fitted, lm_eval)
        → report.json, report.md (+ reliability.png, risk_coverage.png with --data)

`lm_eval`: lm-evaluation-harness results, {task: {metric: {"value", "stderr"}}}
(`evaluate.harness.flatten`), under "lm_eval" in report.json.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import numpy as np

from perspective_jax.evaluate.calibration import ECE_BINS, reliability, risk_coverage
from perspective_jax.evaluate.confidence import METHODS
from perspective_jax.evaluate.metrics import METRICS


def _show(value) -> str:
    if value is None:
        return "—"
    if not math.isfinite(value):
        return "nan"
    if abs(value) >= 1e5 or float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:.4g}"


def metric_rows(values: dict, verdicts: list) -> list[tuple]:
    """(metric, value, unit, gate, PASS/FAIL/"") for every measured or gated metric,
    in registry order."""
    gated = {}
    for v in verdicts:
        gated.setdefault(v.gate.metric, []).append(v)
    rows = []
    for name, metric in METRICS.items():
        if name not in values and name not in gated:
            continue
        for_this = gated.get(name, [None])
        for v in for_this:
            rows.append((name, _show(values.get(name)), metric.unit,
                         "" if v is None else f"{v.gate.op} {v.gate.threshold:g}",
                         "" if v is None else ("PASS" if v.passed else "FAIL")))
    return rows


METRIC_HEAD = ("metric", "value", "unit", "gate", "result")
HARNESS_HEAD = ("task", "metric", "value", "stderr")


def harness_rows(results: dict) -> list[tuple]:
    """(task, metric, value, stderr) of lm-evaluation-harness results."""
    return [(task, metric, _show(v["value"]), _show(v["stderr"]))
            for task, metrics in results.items() for metric, v in metrics.items()]


def text_table(rows: list[tuple], head: tuple = METRIC_HEAD) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa
    return "\n".join([line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in rows])


def markdown_table(rows: list[tuple], head: tuple = METRIC_HEAD) -> str:
    align = {"value": "---:", "stderr": "---:"}
    out = [f"| {' | '.join(head)} |", f"|{'|'.join(align.get(h, '---') for h in head)}|"]
    out += [f"| {' | '.join(str(c) for c in r)} |" for r in rows]
    return "\n".join(out)


def _finite(x):
    return x if x is None or math.isfinite(x) else None


def verdicts_json(verdicts: list) -> list[dict]:
    """The gate verdicts as JSON records (report.json and `perspective-eval --json`)."""
    return [{"metric": v.gate.metric, "op": v.gate.op, "threshold": v.gate.threshold,
             "value": _finite(v.value), "passed": v.passed} for v in verdicts]


def write_report(out: str, header: dict, values: dict, verdicts: list, confidences: dict,
                 fitted: dict, lm_eval: Optional[dict] = None) -> list[str]:
    """Write report.json, report.md and (with confidences) the PNGs into `out`
    (created); returns paths. `lm_eval`: harness results to add, or None."""
    os.makedirs(out, exist_ok=True)
    paths = []
    curves = {name: [{"bin_low": lo, "count": n, "mean_confidence": _finite(c),
                      "accuracy": _finite(a)} for lo, n, c, a in reliability(*confidences[name])]
              for name in METHODS if name in confidences}
    doc = {**header, "metrics": {k: _finite(v) for k, v in values.items()},
           "gates": verdicts_json(verdicts),
           "passed": all(v.passed for v in verdicts), "fitted": fitted,
           "reliability": curves}
    if lm_eval is not None:
        doc["lm_eval"] = lm_eval
    path = os.path.join(out, "report.json")
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=1)
    paths.append(path)
    md = [f"# perspective-eval: {header.get('model_dir', '')}", ""]
    if values or verdicts:
        md += [f"data: {header.get('data', '')}", "",
               markdown_table(metric_rows(values, verdicts)), ""]
    if confidences:
        md += ["![reliability](reliability.png)", "",
               "![risk-coverage](risk_coverage.png)", ""]
    if lm_eval is not None:
        md += ["## lm-evaluation-harness", "",
               markdown_table(harness_rows(lm_eval), HARNESS_HEAD), ""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(md))
    paths.append(path)
    if confidences:
        paths += plot(out, confidences, header.get("title", ""))
    return paths


def plot(out: str, confidences: dict, title: str = "") -> list[str]:
    """reliability.png (accuracy against confidence per bin, one panel per method,
    bar width = bin) and risk_coverage.png (all methods on one axis)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n in METHODS if n in confidences]
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    width = 1.0 / ECE_BINS
    for ax, name in zip(axes.ravel(), names):
        rel = reliability(*confidences[name])
        lows = np.array([r[0] for r in rel])
        acc = np.array([r[3] if r[1] else 0.0 for r in rel])
        ax.bar(lows, acc, width=width, align="edge", edgecolor="k", linewidth=0.4,
               color="tab:blue", label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("confidence", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    rel_path = os.path.join(out, "reliability.png")
    fig.savefig(rel_path, dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 4))
    for name in names:
        cov, risk, area = risk_coverage(*confidences[name])
        ax.plot(cov, risk, label=f"{name} ({area:.3f})", linewidth=1)
    ax.set_xlabel("coverage")
    ax.set_ylabel("risk (error among kept)")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    rc_path = os.path.join(out, "risk_coverage.png")
    fig.savefig(rc_path, dpi=90)
    plt.close(fig)
    return [rel_path, rc_path]
