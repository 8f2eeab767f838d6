"""lm-evaluation-harness tasks run in process on a model directory
(`perspective-eval --lm-eval`), with the "perspective" model (`evaluate.lm_eval_model`).

    manager = task_manager(["perspective_perplexity"], "docs/examples/lm_eval")
    results = run_tasks("models/tiny", ["perspective_perplexity"], manager, limit=None)
        → {task: {metric: {"value": float | None, "stderr": float | None}}}

Task names (lm_eval's own, or defined by YAML files under an include directory;
glob patterns as lm_eval takes them) are checked before any model work: an
unknown one is a one-line error. Standard errors are computed as lm_eval computes
them, with bootstrap resampling in this process (BOOTSTRAP_ITERS draws; lm_eval's
default forks a process pool, which a process running JAX's threads must not do).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

from perspective_jax.errors import UserError

BOOTSTRAP_ITERS = 1000


def _lm_eval():
    """The lm_eval package with the "perspective" model registered (or a one-line
    error saying how to install it)."""
    import perspective_jax.evaluate.lm_eval_model  # noqa: F401  (registers; install hint)
    import lm_eval
    return lm_eval


def parse_tasks(spec: str) -> list[str]:
    """'a,b' → ['a', 'b'] (at least one name)."""
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:
        raise UserError(f"--lm-eval {spec!r}: give task names, e.g. --lm-eval "
                        "perspective_perplexity,hellaswag")
    return tasks


def task_manager(tasks: list[str], include: Optional[str] = None):
    """An lm_eval TaskManager that knows every one of `tasks` (lm_eval's tasks, and
    the YAML tasks under `include`); an unknown name is a one-line UserError. Tasks
    all found under `include` skip indexing lm_eval's thousands of built-in tasks."""
    _lm_eval()
    from lm_eval.tasks import TaskManager
    if include is not None and not os.path.isdir(include):
        raise UserError(f"--lm-eval-include {include}: no such directory")
    if include is not None:
        manager = TaskManager(include_path=include, include_defaults=False)
        if not _unknown(manager, tasks):
            return manager
    manager = TaskManager(include_path=include)
    unknown = _unknown(manager, tasks)
    if unknown:
        where = f" nor under {include}" if include else ""
        raise UserError(f"--lm-eval: unknown task {', '.join(map(repr, unknown))}: not an "
                        f"lm-evaluation-harness task{where} (`lm_eval ls tasks` lists them; "
                        "--lm-eval-include DIR adds YAML tasks of your own)")
    return manager


def _unknown(manager, tasks: list[str]) -> list[str]:
    return [t for t in tasks if not manager.match_tasks([t])]


@contextlib.contextmanager
def _bootstrap_in_process():
    before = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = before


def run_tasks(model_dir: str, tasks: list[str], manager, limit: Optional[int] = None,
              host_budget_mb: float = 1024.0, device_slots: int = 2) -> dict:
    """Evaluate `tasks` (names `manager` knows) on the streamed model; at most `limit`
    documents per task. Returns `flatten` of lm_eval's results."""
    lm_eval = _lm_eval()
    from perspective_jax.evaluate.lm_eval_model import PerspectiveHarnessLM
    names = manager.match_tasks(tasks)
    lm = PerspectiveHarnessLM(model_dir=model_dir, host_budget_mb=host_budget_mb,
                              device_slots=device_slots)
    try:
        with _bootstrap_in_process():
            out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager,
                                          limit=limit, bootstrap_iters=BOOTSTRAP_ITERS,
                                          log_samples=False)
    finally:
        lm.close()
    return flatten(out or {})


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def flatten(results: dict) -> dict:
    """lm_eval's results → {task: {metric: {"value", "stderr"}}}; a metric under a
    filter other than "none" is named "metric,filter"; non-numbers ("N/A") → None."""
    out = {}
    for task, entries in results.get("results", {}).items():
        metrics = {}
        for key, value in entries.items():
            name, _, filt = key.partition(",")
            if not filt or name.endswith("_stderr"):
                continue
            label = name if filt == "none" else key
            metrics[label] = {"value": _number(value),
                              "stderr": _number(entries.get(f"{name}_stderr,{filt}"))}
        out[task] = metrics
    return out
