"""User-declared gates over `perspective-eval`'s metrics (SPEC §5).

A gates file is YAML: a list under `gates:`, each a metric name, a comparison and
a threshold —

    gates:
      - {metric: ece.mpd_triggered, op: "<=", threshold: 0.08}
      - {metric: mpd.decode_ratio, op: ">=", threshold: 0.667}

`load_gates(path)` checks everything up front (unknown metric, comparison or key,
a threshold that is not a finite number, malformed YAML, an empty list): one-line
errors naming the file and the entry. `check(gates, values)` → one `Verdict` each.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Optional

import yaml

from perspective_jax.errors import UserError
from perspective_jax.evaluate.metrics import METRICS

OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}
KEYS = ("metric", "op", "threshold")


@dataclasses.dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"


@dataclasses.dataclass(frozen=True)
class Verdict:
    gate: Gate
    value: Optional[float]       # None: the metric was not measured in this run
    passed: bool


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value):
        raise UserError(f"{where}: threshold must be a finite number, got {value!r}")
    return float(value)


def parse_gates(doc, source: str) -> list[Gate]:
    """Gates from a parsed YAML document (`source` names it in errors)."""
    if not isinstance(doc, dict) or set(doc) != {"gates"}:
        raise UserError(f"{source}: expected one top-level key 'gates:' holding a list")
    items = doc["gates"]
    if not isinstance(items, list) or not items:
        raise UserError(f"{source}: 'gates' must be a non-empty list")
    gates = []
    for n, item in enumerate(items, 1):
        where = f"{source}: gate {n}"
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected a mapping with keys {', '.join(KEYS)}")
        extra, missing = set(item) - set(KEYS), [k for k in KEYS if k not in item]
        if extra or missing:
            what = (f"unknown key {sorted(map(str, extra))[0]!r}" if extra
                    else f"missing key {missing[0]!r}")
            raise UserError(f"{where}: {what} (keys: {', '.join(KEYS)})")
        metric = item["metric"]
        if metric not in METRICS:
            close = [m for m in METRICS if str(metric).split(".")[-1] in m][:3]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"{where}: unknown metric {metric!r}{hint} "
                            "(perspective-eval --list-metrics lists them)")
        if item["op"] not in OPS:
            raise UserError(f"{where}: unknown comparison {item['op']!r}; use one of "
                            f"{', '.join(OPS)}")
        gates.append(Gate(metric, item["op"], _number(item["threshold"], where)))
    return gates


def load_gates(path: str) -> list[Gate]:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except FileNotFoundError:
        raise UserError(f"--gates {path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"--gates {path} is a directory; give a YAML file") from None
    except UnicodeDecodeError:
        raise UserError(f"--gates {path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"--gates {path}: malformed YAML{at}") from None
    return parse_gates(doc, path)


def check(gates: list[Gate], values: dict) -> list[Verdict]:
    """Each gate against the measured `values` (a metric not measured fails)."""
    out = []
    for g in gates:
        v = values.get(g.metric)
        ok = v is not None and math.isfinite(v) and OPS[g.op](v, g.threshold)
        out.append(Verdict(g, v, bool(ok)))
    return out
