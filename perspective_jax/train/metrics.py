"""Metrics sinks: JSON Lines (always), TensorBoard event files, a progress bar."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

from tqdm import tqdm


class MetricsLogger:
    """Writes RUN_DIR/metrics.jsonl and RUN_DIR/tb/ (TensorBoard) events."""

    def __init__(self, run_dir: str, tensorboard: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def log(self, step: int, kind: str, values: dict) -> None:
        record = {"step": int(step), "kind": kind, "time": time.time(), **values}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
                elif isinstance(value, str):
                    self._tb.add_text(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


class NullLogger:
    """The logger of processes other than 0: records nothing."""

    def log(self, step: int, kind: str, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(run_dir: str, kind: Optional[str] = None) -> list[dict]:
    """Records of metrics.jsonl; a step logged twice (after a resume) keeps the last.
    A line that is not a whole record — the torn end of a log whose writer was killed
    or ran out of disk, or a damaged byte — is left out with a note on stderr."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    by_key: dict = {}
    torn = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
                key = (rec["kind"], rec["step"])
            except (ValueError, KeyError, TypeError):
                torn += 1
                continue
            if kind is None or rec["kind"] == kind:
                by_key[key] = rec
    if torn:
        print(f"note: {path}: {torn} damaged line(s) left out", file=sys.stderr)
    return sorted(by_key.values(), key=lambda r: (r["step"], r["kind"]))


def progress_bar(total: int, initial: int, enabled: bool, desc: str):
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc,
                dynamic_ncols=True, unit="step")
