"""The metric registry of `perspective-eval`: every metric a report holds and a gate
may name, defined once with its unit and which direction is better.

    METRICS["ece.temperature"]  → Metric("ece.temperature", "", "lower", "…")
    register("safety.violation_rate", "", "lower", "…")   # a later capability adds its own

Gates (`evaluate.gates`) refuse names that are not registered, so a typo is an
error rather than a gate that can never fail.
"""

from __future__ import annotations

import dataclasses

from perspective_jax.evaluate.confidence import METHODS

DIRECTIONS = ("lower", "higher", "none")


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    better: str          # "lower", "higher" or "none" (informational)
    description: str

    def __post_init__(self):
        if self.better not in DIRECTIONS:
            raise ValueError(f"metric {self.name}: better must be one of {DIRECTIONS}")


METRICS: dict[str, Metric] = {}


def register(name: str, unit: str, better: str, description: str) -> Metric:
    """Add a metric (names are unique: registering one twice is a programming error)."""
    if name in METRICS:
        raise ValueError(f"metric {name!r} is registered twice")
    METRICS[name] = metric = Metric(name, unit, better, description)
    return metric


register("val_loss", "nats/token", "lower", "teacher-forced next-token loss of P0")
register("bits_per_byte", "bits/byte", "lower", "val_loss in bits per byte of text")
register("accuracy", "", "higher", "share of positions whose argmax is the next token")
register("eval_tokens", "tokens", "none", "positions scored (test split)")
register("temperature", "", "none", "softmax temperature fitted on the validation split")
register("mpd.trigger_rate", "", "none",
         "share of test positions where MPD's trigger fires (teacher-forced)")
_WHAT = {"softmax": "max softmax probability", "temperature": "temperature-scaled softmax",
         "mpd_agreement_forked": "SPEC's MPD confidence, views forked from P0's state",
         "mpd_agreement_persistent": "SPEC's MPD confidence, persistent states",
         "mpd_ensemble_forked": "views' mean probability of MPD's token (forked)",
         "mpd_ensemble_persistent": "views' mean probability of MPD's token (persistent)",
         "mpd_triggered": "MPD where the trigger fires, softmax elsewhere",
         "logistic": "logistic calibrator over softmax and MPD features"}
for _m in METHODS:
    register(f"ece.{_m}", "", "lower", f"expected calibration error (15 bins): {_WHAT[_m]}")
    register(f"auroc.{_m}", "", "higher", f"AUROC of confidence for correct: {_WHAT[_m]}")
    register(f"aurc.{_m}", "", "lower", f"area under the risk-coverage curve: {_WHAT[_m]}")
register("decode_tok_per_s", "tok/s", "higher", "streamed decode rate without MPD")
register("decode_tok_per_s_mpd", "tok/s", "higher", "streamed decode rate with MPD")
register("mpd.decode_ratio", "", "higher", "decode rate with MPD / without")
register("mpd.decode_trigger_rate", "", "none", "share of decoded tokens where MPD ran")
register("mpd.extra_expert_bytes_per_token", "bytes", "lower",
         "expert bytes MPD's views moved per decoded token")
register("peak_host_bytes", "bytes", "lower", "peak resident memory of the process")
register("device_bytes", "bytes", "lower",
         "bytes the engine holds on the device (weights, slots, state)")
# the safety projection (SPEC §3.9; evaluate.safety), with --safety on a model with a polytope
register("spp_block_rate", "", "higher",
         "share of red-team contexts that elicit a flagged string without the projection "
         "(greedy) whose continuation with it holds none")
register("spp_block_rate_sampled", "", "higher",
         "spp_block_rate sampling at temperature 0.8 (same seeds on and off)")
register("spp_emit_rate_without", "", "none",
         "share of red-team contexts whose greedy continuation holds a flagged string, no projection")
register("spp_emit_rate_with", "", "lower",
         "share of red-team contexts whose greedy continuation holds a flagged string, projection on")
register("spp_false_positive_rate", "", "lower",
         "share of safe held-out contexts whose greedy continuation changes with the projection")
register("spp_loss_increase", "nats/token", "lower",
         "teacher-forced loss on safe held-out text with the projection minus without")
register("spp_active_rate", "", "lower",
         "share of safe held-out positions where the projection moved the state")
register("spp_ms_per_token", "ms", "lower", "the projection's time per decoded token")
register("spp_step_share", "", "lower",
         "the projection's time per token / the decode step's time per token")
# the hypervector memory (evaluate.memory, perspective-eval --memory)
register("memory.recall_accuracy", "", "higher",
         "share of stored keys that recall their own value")
register("memory.false_hit_rate", "", "lower",
         "share of unrelated held-out contexts that recall a value")
register("memory.value_prob", "", "none",
         "mean p(value token | key, value so far) without the memory")
register("memory.value_prob_injected", "", "higher",
         "the same with the recalled value injected at each value position")
register("memory.value_prob_gain", "", "higher", "value_prob_injected / value_prob")
register("memory.query_us", "µs", "lower", "one recall: encode the context, query, vector")
# a trained adapter (evaluate.adapter, perspective-eval --adapter)
register("adapter.loss_base", "nats/token", "none",
         "next-token loss of the test segments without the adapter (StreamedTarget.loss)")
register("adapter.loss", "nats/token", "lower",
         "next-token loss of the same segments with the adapter")
register("adapter.loss_gain", "nats/token", "higher", "adapter.loss_base − adapter.loss")
register("adapter.rank", "", "none", "the adapter's LoRA rank")
