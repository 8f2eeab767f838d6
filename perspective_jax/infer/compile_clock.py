"""Seconds this process has spent turning Python into XLA executables.

    compile_clock.seconds()   # cumulative: tracing + lowering + backend compile

The engine subtracts the seconds that elapsed during a feed from its prefill and
decode timings, so `--stats` tok/s measure the model, not the first call of each
jitted function, and reports them as `compile_s` (llama.cpp likewise reports load
time apart from prompt and generation speed). The sum comes from `jax.monitoring`
duration events; the backend-compile event also covers loading an executable from
the persistent compilation cache.
"""

from __future__ import annotations

import threading

import jax

EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
          "/jax/core/compile/jaxpr_to_mlir_module_duration",
          "/jax/core/compile/backend_compile_duration")

_lock = threading.Lock()
_total = [0.0]
_registered = [False]


def _listen(event: str, duration: float, **_) -> None:
    if event in EVENTS:
        with _lock:
            _total[0] += duration


def seconds() -> float:
    """Cumulative compile seconds since the first call (which starts the clock)."""
    with _lock:
        if not _registered[0]:
            jax.monitoring.register_event_duration_secs_listener(_listen)
            _registered[0] = True
        return _total[0]
