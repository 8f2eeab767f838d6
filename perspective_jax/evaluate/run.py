"""One evaluation of a streamed model (`perspective-eval`): loss, calibration, decode
speed with and without MPD, memory, an adapter — every value a registered metric.

    result = evaluate_model("models/tiny", ["held_out/"], EvalOptions())
    result.values["ece.temperature"], result.confidences["softmax"]

The text is tokenized with the model's own tokenizer and cut into evenly spread
segments (`teacher_forced.segments`); even segments form the validation split
(the temperature and the logistic calibrator are fitted there), odd ones the test
split every reported number comes from. With an adapter, `adapter.*` compares the
test split's loss without and with it (`evaluate.adapter`); the other metrics are
the model's own.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, NamedTuple, Optional

import numpy as np

from perspective_jax.config.schema import MPDConfig
from perspective_jax.data.corpus import expand_paths, read_documents
from perspective_jax.errors import UserError
from perspective_jax.evaluate import adapter as adapter_eval
from perspective_jax.evaluate import confidence as C
from perspective_jax.evaluate import memory as memory_eval
from perspective_jax.evaluate.memory import MemoryEvalOptions
from perspective_jax.evaluate.safety import SafetyEvalOptions, measure
from perspective_jax.evaluate.teacher_forced import score, segments
from perspective_jax.infer.engine import StreamingEngine, load_model_tokenizer
from perspective_jax.infer.options import EngineOptions
from perspective_jax.infer.safety_guard import load_guard, model_polytope
from perspective_jax.infer.session import Conversation
from perspective_jax.infer.stats import peak_rss_bytes
from perspective_jax.model.sampling import Sampling
from perspective_jax.modeldir.manifest import read_manifest


DECODE_ROUNDS = 5


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """segment_len tokens per scored segment, at most max_segments of them (half
    for validation), decode_tokens per timed generation, the MPD settings, whether
    to score persistent-state MPD too, and the engine's host budget and slots."""

    segment_len: int = 128
    max_segments: int = 32
    decode_tokens: int = 64
    mpd: MPDConfig = MPDConfig()
    persistent: bool = True
    host_budget_mb: float = 1024.0
    device_slots: int = 2
    safety: Optional[SafetyEvalOptions] = None     # measure the safety projection
    memory: Optional[MemoryEvalOptions] = None     # measure a hypervector memory
    adapter: Optional[str] = None                  # measure an adapter file (adapter.*)

    def __post_init__(self):
        for name, lo in (("segment_len", 2), ("max_segments", 2), ("decode_tokens", 2),
                         ("device_slots", 2)):
            if getattr(self, name) < lo:
                raise UserError(f"{name.replace('_', '-')} must be >= {lo}, got "
                                f"{getattr(self, name)}")


class EvalResult(NamedTuple):
    values: dict             # metric name → float
    confidences: dict        # method → (confidence [N], correct [N]) on the test split
    fitted: dict             # what was fitted on the validation split


def read_text(specs: list) -> str:
    """The evaluation text: files, directories and globs (as --data of training)."""
    docs = read_documents(expand_paths(specs, "--data"))
    text = "\n".join(d.text for d in docs)
    if not text.strip():
        raise UserError("--data holds no text to evaluate on")
    return text


def _decode_rate(engine, tokenizer, prompt: str, n: int, mpd) -> tuple[float, dict]:
    """Greedy tokens per second over n tokens (first to last token, so neither the
    prompt's prefill nor compilation counts), and the engine's MPD counters of the run."""
    conv = Conversation(engine, tokenizer, Sampling(temperature=0), mpd=mpd)
    stamps = []
    before = engine.stats.mpd_triggered, engine.stats.mpd_tokens, engine.stats.mpd_extra_bytes
    conv.generate(prompt, n, on_token=lambda _: stamps.append(time.perf_counter()))
    s = engine.stats
    counts = {"triggered": s.mpd_triggered - before[0], "tokens": s.mpd_tokens - before[1],
              "extra_bytes": s.mpd_extra_bytes - before[2]}
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        return float("nan"), counts
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), counts


def evaluate_model(model_dir: str, data: list, opts: EvalOptions = EvalOptions(),
                   log: Callable[[str], None] = lambda _: None) -> EvalResult:
    manifest = read_manifest(model_dir)
    if opts.safety is not None:              # no polytope: one line before any work
        model_polytope(model_dir, manifest, required=True)
    if opts.adapter is not None:             # another model's or damaged: the same
        adapter_eval.check(manifest, opts.adapter)
    text = read_text(data)
    engine = StreamingEngine(model_dir, EngineOptions(host_budget_mb=opts.host_budget_mb,
                                                      device_slots=opts.device_slots),
                             manifest=manifest)
    try:
        tokenizer = load_model_tokenizer(model_dir, manifest)
        ids = np.asarray(tokenizer.encode(text), np.int32)
        segs = segments(ids, opts.segment_len, opts.max_segments)
        if segs.shape[0] < 2:
            raise UserError(f"the evaluation text has {ids.size} tokens: one segment of "
                            f"{opts.segment_len}; give at least {2 * opts.segment_len + 1} "
                            "tokens (validation and test) or a smaller --segment-len")
        states = ("forked", "persistent") if opts.persistent else ("forked",)
        log(f"scoring {segs.shape[0]} segments of {opts.segment_len} tokens "
            f"(MPD: {', '.join(states)})")
        scored = score(engine, segs, opts.mpd, states)
        val, test = scored.select(scored.segment % 2 == 0), scored.select(scored.segment % 2 == 1)
        conf = C.methods(val, test, opts.mpd)
        fitted = conf.pop("fitted")
        loss = C.nll_per_token(test)
        values = {"val_loss": loss,
                  "bits_per_byte": loss / math.log(2) * ids.size / len(text.encode("utf-8")),
                  "eval_tokens": float(test.targets.size),
                  "temperature": fitted["temperature"],
                  "mpd.trigger_rate": fitted["trigger_rate"]}
        rows = C.table(conf)
        values["accuracy"] = rows["softmax"].accuracy
        for name, row in rows.items():
            values[f"ece.{name}"], values[f"auroc.{name}"], values[f"aurc.{name}"] = (
                row.ece, row.auroc, row.aurc)
        log(f"decoding {opts.decode_tokens} tokens with and without MPD")
        prompt = tokenizer.decode(ids[: min(16, ids.size)])
        # round 0 compiles both paths (expert groups of every size); then DECODE_ROUNDS
        # interleaved rounds, the best of each (the machine's noise only slows runs)
        plain = with_mpd = 0.0
        for rnd in range(DECODE_ROUNDS + 1):
            rate, _ = _decode_rate(engine, tokenizer, prompt, opts.decode_tokens, None)
            rate_mpd, counts = _decode_rate(engine, tokenizer, prompt, opts.decode_tokens,
                                            opts.mpd)
            if rnd:
                plain, with_mpd = max(plain, rate), max(with_mpd, rate_mpd)
        values.update({
            "decode_tok_per_s": plain, "decode_tok_per_s_mpd": with_mpd,
            "mpd.decode_ratio": with_mpd / plain if plain else float("nan"),
            "mpd.decode_trigger_rate": counts["triggered"] / max(counts["tokens"], 1),
            "mpd.extra_expert_bytes_per_token": counts["extra_bytes"] / max(counts["tokens"], 1),
            "device_bytes": float(engine.device_bytes_needed)})
        if opts.safety is not None:
            guard = load_guard(model_dir, manifest, engine, tokenizer)
            spp, details = measure(engine, tokenizer, guard, text, opts.safety, log)
            values.update(spp)
            fitted["safety"] = details
        if opts.memory is not None:
            m = opts.memory
            width = m.recall.window
            starts = np.linspace(0, max(0, ids.size - width), m.contexts).astype(int)
            contexts = [ids[s:s + width].tolist() for s in starts]
            values.update(memory_eval.measure(engine, tokenizer, m.path, m.recall, contexts,
                                              m.entries, log))
        if opts.adapter is not None:
            values.update(adapter_eval.measure(engine, opts.adapter, segs[1::2], log))
        rss = peak_rss_bytes()
        if rss is not None:
            values["peak_host_bytes"] = float(rss)
    finally:
        engine.close()
    return EvalResult(values, conf, fitted)
