"""The server's Prometheus metrics (GET /metrics, text exposition format).

    perspective_requests_total{endpoint, status}      counter
    perspective_prompt_tokens_total                   counter
    perspective_generation_tokens_total               counter
    perspective_time_to_first_token_seconds           histogram
    perspective_time_per_output_token_seconds         histogram (one batched step)
    perspective_decode_tokens_per_second              gauge (last 10 s, all sequences)
    perspective_queue_depth / _running_sequences      gauges
    perspective_host_cache_hit_rate                   gauge (from the engine)
    perspective_expert_bytes_moved_total{kind}        counter, host→device bytes (same / delta /
                                                      host_delta / full / wasted)
    perspective_mpd_trigger_rate                      gauge (MPD tokens that ran the views)
    perspective_safety_tokens_total                   counter (guarded positions projected)
    perspective_safety_projections_total              counter (of which the projection moved)
    perspective_memory_lookups_total                  counter (memory queries on disagreement)
    perspective_memory_injections_total               counter (tokens decided with a value)
    perspective_adapter_requests_total                counter (requests decoded with the
                                                      adapter, perspective-serve --adapter)

Engine values are read when scraped, from the engine's own counters.
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from perspective_jax.infer.stats import KINDS

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW_S = 10.0


class ServerMetrics:
    def __init__(self, scheduler_ref=lambda: None):
        self.registry = CollectorRegistry()
        self.scheduler_ref = scheduler_ref
        self.requests = Counter("perspective_requests", "Requests answered, by endpoint and "
                                "HTTP status", ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("perspective_prompt_tokens", "Prompt tokens prefilled",
                                     registry=self.registry)
        self.generation_tokens = Counter("perspective_generation_tokens",
                                         "Tokens generated", registry=self.registry)
        self.ttft = Histogram("perspective_time_to_first_token_seconds", "Submission to "
                              "first token", buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("perspective_time_per_output_token_seconds", "One batched "
                              "decode step (each running sequence gains a token)",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.adapter_requests = Counter("perspective_adapter_requests", "Requests decoded "
                                        "with the server's adapter (perspective.adapter)",
                                        registry=self.registry)
        self._recent: collections.deque = collections.deque()     # (time, tokens)
        self._lock = threading.Lock()
        self.registry.register(_EngineCollector(self))

    # called from the scheduler thread
    def step(self, rows: int, seconds: float) -> None:
        self.tpot.observe(seconds)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, rows))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def adapter_request(self) -> None:
        self.adapter_requests.inc()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            recent = [n for t, n in self._recent if t >= now - RATE_WINDOW_S]
        return sum(recent) / RATE_WINDOW_S

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Gauges and counters read from the scheduler and its engine at scrape time."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        sched = self.metrics.scheduler_ref()
        g = GaugeMetricFamily
        yield g("perspective_decode_tokens_per_second", "Tokens decoded per second over the "
                f"last {RATE_WINDOW_S:g} s, all sequences", value=self.metrics.tokens_per_second())
        yield g("perspective_queue_depth", "Requests waiting to start",
                value=sched.queue_depth if sched else 0)
        yield g("perspective_running_sequences", "Sequences in the running batch",
                value=sched.running_sequences if sched else 0)
        engine = sched.engine if sched is not None else None
        if engine is None:
            return
        s = engine.stats
        if engine.routed:
            host = engine.host
            lookups = host.hits + host.misses
            yield g("perspective_host_cache_hit_rate", "Host expert-cache hits / lookups",
                    value=host.hits / lookups if lookups else 0.0)
            moved = CounterMetricFamily("perspective_expert_bytes_moved", "Expert bytes "
                                        "brought to the device, by kind", labels=["kind"])
            for kind in (*KINDS, "wasted"):
                moved.add_metric([kind], float(s.bytes_moved[kind]))
            yield moved
        yield g("perspective_mpd_trigger_rate", "Share of MPD-decided tokens whose views ran",
                value=s.mpd_triggered / s.mpd_tokens if s.mpd_tokens else 0.0)
        c = CounterMetricFamily
        yield c("perspective_safety_tokens", "Positions of guarded sequences whose logits "
                "the safety projection saw", value=float(s.safety_tokens))
        yield c("perspective_safety_projections", "Guarded positions the safety projection "
                "moved (their state was outside the polytope)", value=float(s.safety_active))
        yield c("perspective_memory_lookups", "Memory queries where MPD's views found no "
                "majority", value=float(s.memory_lookups))
        yield c("perspective_memory_injections", "Tokens decided again with a recalled "
                "value injected", value=float(s.memory_injections))
