"""Several processes, one training run (JAX's multi-controller runtime).

    start(init_kwargs, label)          # jax.distributed.initialize, before any computation
    is_primary()                       # process 0: the one that writes files and logs
    value = on_primary(fn)             # process 0 runs fn; every process gets its
                                       #   JSON result, or raises its UserError
    any_process(flag) -> bool          # True on every process if one says True
    barrier(name)                      # wait for every process
    rows_of_process(sharding, shape)   # this process's rows of a global batch

Every process runs the same computations in the same order; process 0 alone
decides and writes what is not an array (the run directory's lock and files, the
resume step, logs), and shares the decision with `on_primary`, so all processes
start from the same state or stop with the same one-line error.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import jax
import numpy as np

from perspective_jax.errors import UserError


def start(init_kwargs: dict, label: str) -> None:
    """Join the run (`jax.distributed.initialize`); a failure is one line."""
    try:
        jax.distributed.initialize(**init_kwargs)
    except (RuntimeError, ValueError) as exc:   # XlaRuntimeError is a RuntimeError
        text = " ".join(str(exc).split())
        if "DEADLINE_EXCEEDED" in text or "timed out" in text.lower():
            why = ("not every process joined in time (start the same command on every "
                   "host, or raise --init-timeout)")
        else:
            why = text[:200]
        raise UserError(f"{label}: cannot join the distributed run: {why}") from None


def is_primary() -> bool:
    return jax.process_index() == 0


def _broadcast_bytes(data: bytes) -> bytes:
    from jax.experimental import multihost_utils
    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    buf = np.frombuffer(data, np.uint8) if is_primary() else np.zeros(n, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes()


def on_primary(fn: Callable[[], Any]) -> Any:
    """`fn()` on process 0; its JSON-able result (or its UserError, raised again) on
    every process. One process: just `fn()`. An unexpected exception on process 0 is
    re-raised there and reported to the others as a one-line error."""
    if jax.process_count() == 1:
        return fn()
    reply, failure = None, None
    if is_primary():
        try:
            reply = {"ok": fn()}
        except UserError as exc:
            reply = {"error": str(exc)}
        except BaseException as exc:
            failure = exc
            reply = {"error": f"process 0 failed ({type(exc).__name__}: {exc}); see its "
                              "output"}
    reply = json.loads(_broadcast_bytes(json.dumps(reply).encode() if is_primary() else b""))
    if failure is not None:
        raise failure
    if "error" in reply:
        raise UserError(reply["error"])
    return reply["ok"]


def barrier(name: str) -> None:
    """Wait until every process gets here (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True on every process when any process passes True (one small collective)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.int32(bool(flag)))
    return bool(np.max(flags))


def rows_of_process(sharding: jax.sharding.Sharding, shape: tuple[int, ...],
                    axis: int = 1) -> tuple[int, int]:
    """(lo, hi): the rows along `axis` of a global array of `shape` that this process's
    devices hold under `sharding` — the part of the batch it must feed."""
    spans = {(s.start or 0, shape[axis] if s.stop is None else s.stop)
             for s in (idx[axis] for idx in
                       sharding.addressable_devices_indices_map(shape).values())}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    covered = sum(b - a for a, b in spans)
    if covered != hi - lo:
        raise UserError(f"this process's devices hold batch rows {sorted(spans)}, not one "
                        "contiguous block; order the mesh so each host's devices are "
                        "adjacent along the batch axes")
    return lo, hi
