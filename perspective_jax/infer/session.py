"""A conversation on a streaming engine: sampling, stop strings, streamed text,
and a saved state (PDR states + KV rings + pending token + sampler position)
from which it continues exactly as if it had never stopped.

    conv = Conversation(engine, tokenizer, Sampling(temperature=0.8), seed=0)
    text = conv.generate("To be", max_tokens=64, stop=["\\n\\n"], on_text=print_fn)
    conv.save("chat.state");  conv = Conversation.load(engine, tokenizer, "chat.state", sampling)

The last sampled token is not fed until the conversation continues, so a
continuation (with or without new prompt text) feeds it first.

With `mpd=MPDConfig(...)` each token is decided by Multi-Perspective Decoding
(`infer.mpd_engine.mpd_on_engine`: when a step triggers, P1..P3 run as one batched
engine step on the token just fed, forked from the state before it);
`on_token(TokenInfo)` receives every token with its confidence. With
`guard=SafetyGuard(...)` (infer.safety_guard) every logits the conversation samples
from — the prompt's last position, each decode step, MPD's views — is projected onto
the safety polytope with the flagged rows active after the text so far (`tail`, its
last bytes, kept in the state file too). Text is cut and
streamed by `infer.text_stream.TextStream`. A state file
carries a format version and a sha256 over all its content (`cache_io.
write_checked`): an edited position or step count, or any flipped byte, is a
one-line error naming the file.

With `memory=MemoryRecall(...)` (memory.recall; needs `mpd`) a token whose views
found no majority is decided again with the value the memory recalls for the last
ids fed (`context`, kept in the state file) injected into the residual stream
(`infer.mpd_engine.recall_on_engine`, SPEC §3.7).
"""

from __future__ import annotations

import json
import os
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np

from perspective_jax.config.schema import MPDConfig
from perspective_jax.errors import UserError
from perspective_jax.infer.mpd_engine import mpd_on_engine
from perspective_jax.infer.state import EngineState
from perspective_jax.infer.text_stream import TextStream
from perspective_jax.model.sampling import Sampling, sample_rows
from perspective_jax.model.cache_io import (cache_from_tensors, flatten_cache, read_checked,
                                            write_checked)

STATE_FORMAT = "perspective-conversation/2"     # 2: a sha256 over the content
OLDER_FORMATS = ("perspective-conversation/1",)


def sample_token(logits: np.ndarray, sampling: Sampling, seed: int, step: int,
                 n_valid: Optional[int] = None) -> int:
    """Token `step` of a sequence seeded `seed`, from logits [V], by the one sampling
    rule (`model.sampling.sample_rows`: key fold_in(key(seed), step)), below n_valid
    (the tokenizer's piece count)."""
    return int(sample_rows(np.asarray(logits)[None], [seed], [step], sampling, n_valid)[0])


class TokenInfo(NamedTuple):
    """One generated token for `on_token`: its id, its text (the decoded text it
    added), MPD's confidence, whether MPD triggered, the decision kind
    (model.mpd EMIT_P0 / EMIT_VOTE / UNCERTAIN), and whether the memory's value
    decided it (`recalled`)."""

    id: int
    text: str
    confidence: float
    triggered: bool
    kind: int
    recalled: bool = False


class Conversation:
    def __init__(self, engine, tokenizer, sampling: Sampling = Sampling(), seed: int = 0,
                 mpd: Optional[MPDConfig] = None, guard=None, memory=None):
        self.engine, self.tokenizer, self.sampling, self.seed = engine, tokenizer, sampling, seed
        if mpd is not None and mpd.state != "forked":
            raise UserError(f"mpd.state={mpd.state!r}: the streaming engine runs MPD with "
                            "views forked from P0's state (mpd.state=forked); persistent "
                            "states are in-memory only (model.generate.generate_mpd)")
        self.mpd = mpd
        self.mpd_spent = 0                   # MPD triggers honoured (the budget, max_rate)
        self.state = engine.new_state()
        self.pending: list[int] = []
        self.steps = 0                       # tokens sampled so far (the sampler's position)
        self.guard = guard                   # infer.safety_guard.SafetyGuard, or None
        self.tail = b""                      # the text fed so far, its last bytes (guard)
        if memory is not None and mpd is None:
            raise UserError("a memory is consulted when MPD's perspectives disagree; turn "
                            "MPD on (--mpd) to use --memory")
        self.memory = memory                 # memory.recall.MemoryRecall, or None
        self.context: list[int] = []         # the last ids fed (the memory's query)
        if memory is not None:
            engine.stats.memory_on = True

    def generate(self, prompt: str, max_tokens: int, stop: Sequence[str] = (),
                 eos_id: Optional[int] = None,
                 on_text: Optional[Callable[[str], None]] = None,
                 on_token: Optional[Callable[[TokenInfo], None]] = None) -> str:
        """Feed pending token + prompt, sample up to `max_tokens`; returns the new text
        (cut before the first stop string). `on_text` receives text as it is produced;
        `on_token` every token with its confidence (`TokenInfo`)."""
        if max_tokens < 1:
            raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")
        feed = self.pending + (self.tokenizer.encode(prompt).tolist() if prompt else [])
        if not feed:
            raise UserError("the prompt is empty; give some text to continue from")
        before = self.state                   # the state before the last token fed (MPD)
        if self.mpd is not None and len(feed) > 1:
            _, before = self.engine.forward(np.asarray(feed[:-1], np.int32), self.state)
        logits = self._feed(feed if self.mpd is None else feed[-1:], before, feed)
        fed = feed[-1]
        steps0 = self.steps
        stream = TextStream(self.tokenizer, stop)
        said = ""
        while True:
            tok = sample_token(logits, self.sampling, self.seed, self.steps,
                               self.tokenizer.vocab_size)
            info = None
            if self.mpd is not None:
                self._remember(feed if self.steps == steps0 else [fed])
                info = mpd_on_engine(self.engine, logits, tok, self.steps, self.mpd,
                                     self.mpd_spent, before, fed, self.guard, self.tail,
                                     self.memory, self.context, self._resampler())
                tok = int(info.token[0])
                self.mpd_spent += int(info.triggered[0])
            self.pending, self.steps = [tok], self.steps + 1   # sampled, not yet fed
            last = tok == eos_id or len(stream.ids) + 1 >= max_tokens
            delta, stopped = stream.push(tok, last)
            if on_token is not None:
                text = stream.decoded
                piece = text[len(said):] if text.startswith(said) else text
                said = text
                conf = (top_probability(logits) if info is None
                        else float(info.confidence[0]))
                on_token(TokenInfo(tok, piece, conf,
                                   info is not None and bool(info.triggered[0]),
                                   0 if info is None else int(info.kind[0]),
                                   info is not None and info.recalled is not None
                                   and bool(info.recalled[0])))
            if on_text and delta:
                on_text(delta)
            if stopped or last:
                return stream.text
            before, fed = self.state, tok
            logits = self._feed([tok], self.state, [tok])

    def _remember(self, ids) -> None:
        """Extend the memory's context by the ids just fed (kept to its window)."""
        if self.memory is not None:
            self.context = (self.context + [int(t) for t in ids])[-self.memory.cfg.window:]

    def _resampler(self):
        """The sampling rule at this step (a token decided again with a memory value
        is drawn with the same key as P0's)."""
        steps, n = self.steps, self.tokenizer.vocab_size
        return lambda logits: sample_token(logits, self.sampling, self.seed, steps, n)

    def _feed(self, tokens: list, state, text: list) -> np.ndarray:
        """Feed `tokens` from `state`; the conversation's text grows by `text` (the
        tokens fed since the tail: `tokens` or more). Returns the last logits [V],
        projected with the guard; state and tail change only when the feed succeeds."""
        tokens = np.asarray(tokens, np.int32)
        if self.guard is None:
            logits, self.state = self.engine.forward(tokens, state)
            return logits
        tail = self.guard.extend(self.tail, text)
        logits, self.state = self.engine.forward(tokens, state, self.guard.extensions([tail]))
        self.guard.observe(self.engine)
        self.tail = tail
        return logits

    # ---------------------------------------------------------------- save/resume
    def save(self, path: str) -> None:
        """Write the conversation state atomically (safetensors + metadata + checksum)."""
        tensors = flatten_cache(self.state.to_cache())
        tensors["pending"] = np.asarray(self.pending, np.int32)
        meta = {"format": STATE_FORMAT, "steps": str(self.steps), "seed": str(self.seed),
                "mpd_spent": str(self.mpd_spent), "model": self.engine.identity,
                "memory_context": json.dumps(self.context),
                "text_tail": self.tail.hex()}
        write_checked(tensors, meta, path)

    @classmethod
    def load(cls, engine, tokenizer, path: str, sampling: Sampling = Sampling(),
             seed: Optional[int] = None, mpd: Optional[MPDConfig] = None,
             guard=None, memory=None) -> "Conversation":
        if os.path.isdir(path):
            raise UserError(f"--resume-state {path} is a directory; give a state file")
        if not os.path.isfile(path):
            raise UserError(f"--resume-state {path}: no such file")
        tensors, meta = read_checked(path, STATE_FORMAT, "a conversation state file",
                                     OLDER_FORMATS, "start a new conversation")
        if meta.get("model") != engine.identity:
            raise UserError(f"{path} was saved with another model; resume it with the "
                            "model directory that wrote it")
        saved_seed, steps = _counter(meta, "seed", path), _counter(meta, "steps", path)
        if any(np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()
               for v in tensors.values()):
            raise UserError(f"{path}: holds non-finite values; the state file is damaged")
        pending = tensors.get("pending")
        if pending is None or pending.ndim != 1 or pending.size > 1 or (
                pending.size and not 0 <= int(pending[0]) < engine.model.vocab_size):
            raise UserError(f"{path}: its pending token is missing or invalid; the state "
                            "file is damaged")
        conv = cls(engine, tokenizer, sampling, saved_seed if seed is None else seed, mpd,
                   guard, memory)
        stacked = cache_from_tensors(tensors, engine.model, path, allowed_extra=("pending",))
        if stacked["next_pos"].shape != (1,):
            raise UserError(f"{path}: holds a batch of {stacked['next_pos'].shape[0]} "
                            "conversations; perspective-infer resumes one")
        conv.state = EngineState.from_cache(stacked)
        conv.pending = pending.astype(int).tolist()
        conv.steps = steps
        # MPD's budget so far (files written before it was saved: 0)
        conv.mpd_spent = _counter(meta, "mpd_spent", path) if "mpd_spent" in meta else 0
        try:                                 # the text's tail (files before it: none)
            conv.tail = bytes.fromhex(meta.get("text_tail", ""))
        except ValueError:
            raise UserError(f"{path}: its 'text_tail' field is invalid; the state file is "
                            "damaged") from None
        try:                                 # the memory's context (files before it: none)
            context = json.loads(meta.get("memory_context", "[]"))
            if not (isinstance(context, list) and all(
                    isinstance(t, int) and 0 <= t < engine.model.vocab_size for t in context)):
                raise ValueError
        except ValueError:
            raise UserError(f"{path}: its 'memory_context' field is invalid; the state file "
                            "is damaged") from None
        conv.context = context
        return conv


def top_probability(logits: np.ndarray) -> float:
    """max softmax(logits) = 1 / Σ exp(z − max z)."""
    z = np.asarray(logits, np.float64)
    return float(1.0 / np.exp(z - z.max()).sum())


def _counter(meta: dict, key: str, path: str) -> int:
    """A state file's non-negative integer metadata field `key` (< 2^32)."""
    try:
        value = int(meta[key])
    except (KeyError, ValueError):
        value = -1
    if not 0 <= value < 2 ** 32:
        raise UserError(f"{path}: its {key!r} field is missing or invalid; the state file "
                        "is damaged")
    return value


def describe(report: dict) -> str:
    """The --stats table."""
    lines = ["| statistic | value |", "|---|---:|"]
    for key, value in report.items():
        if isinstance(value, dict):
            value = json.dumps(value)
        elif isinstance(value, float):
            value = f"{value:.4g}"
        lines.append(f"| {key} | {value} |")
    return "\n".join(lines)
