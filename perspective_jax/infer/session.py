"""A conversation on a streaming engine: sampling, stop strings, streamed text,
and a saved state (PDR states + KV rings + pending token + sampler position)
from which it continues exactly as if it had never stopped.

    conv = Conversation(engine, tokenizer, Sampling(temperature=0.8), seed=0)
    text = conv.generate("To be", max_tokens=64, stop=["\\n\\n"], on_text=print_fn)
    conv.save("chat.state");  conv = Conversation.load(engine, tokenizer, "chat.state", sampling)

The last sampled token is not fed until the conversation continues, so a
continuation (with or without new prompt text) feeds it first. A state file
carries a format version and a sha256 over all its content (`cache_io.
write_checked`): an edited position or step count, or any flipped byte, is a
one-line error naming the file.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from perspective_jax.errors import UserError
from perspective_jax.infer.state import EngineState
from perspective_jax.model.sampling import Sampling, sample_next
from perspective_jax.model.cache_io import (cache_from_tensors, flatten_cache, read_checked,
                                            write_checked)

STATE_FORMAT = "perspective-conversation/2"     # 2: a sha256 over the content
OLDER_FORMATS = ("perspective-conversation/1",)


def sample_token(logits: np.ndarray, sampling: Sampling, key,
                 n_valid: Optional[int] = None) -> int:
    """One token from logits [V] by the one sampling rule (`model.sampling`), below
    n_valid (the tokenizer's piece count)."""
    return int(sample_next(jnp.asarray(logits)[None], key, sampling, n_valid)[0])


def _streamable(text: str, stop: Sequence[str]) -> str:
    """The part of `text` that can be shown while generation goes on: without a split
    UTF-8 character at its end, nor an end that may be the start of a stop string."""
    text = text.rstrip("\ufffd")
    held = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return text[: len(text) - held]


class Conversation:
    def __init__(self, engine, tokenizer, sampling: Sampling = Sampling(), seed: int = 0):
        self.engine, self.tokenizer, self.sampling, self.seed = engine, tokenizer, sampling, seed
        self.state = engine.new_state()
        self.pending: list[int] = []
        self.steps = 0                       # tokens sampled so far (the sampler's position)

    def generate(self, prompt: str, max_tokens: int, stop: Sequence[str] = (),
                 eos_id: Optional[int] = None,
                 on_text: Optional[Callable[[str], None]] = None) -> str:
        """Feed pending token + prompt, sample up to `max_tokens`; returns the new text
        (cut before the first stop string). `on_text` receives text as it is produced."""
        if max_tokens < 1:
            raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")
        feed = self.pending + (self.tokenizer.encode(prompt).tolist() if prompt else [])
        if not feed:
            raise UserError("the prompt is empty; give some text to continue from")
        logits, self.state = self.engine.forward(np.asarray(feed, np.int32), self.state)
        out: list[int] = []
        shown = ""
        base = jax.random.key(self.seed)
        while True:
            tok = sample_token(logits, self.sampling, jax.random.fold_in(base, self.steps),
                               self.tokenizer.vocab_size)
            self.pending, self.steps = [tok], self.steps + 1   # sampled, not yet fed
            out.append(tok)
            text = self.tokenizer.decode(np.asarray(out))
            cut = min((text.find(s) for s in stop if s and s in text), default=-1)
            done = cut >= 0 or tok == eos_id or len(out) >= max_tokens
            if cut >= 0:
                text = text[:cut]
            stable = text if done else _streamable(text, stop)
            if on_text and len(stable) > len(shown) and stable.startswith(shown):
                on_text(stable[len(shown):])
                shown = stable
            if done:
                return text
            logits, self.state = self.engine.forward(np.asarray([tok], np.int32), self.state)

    # ---------------------------------------------------------------- save/resume
    def save(self, path: str) -> None:
        """Write the conversation state atomically (safetensors + metadata + checksum)."""
        tensors = flatten_cache(self.state.to_cache())
        tensors["pending"] = np.asarray(self.pending, np.int32)
        meta = {"format": STATE_FORMAT, "steps": str(self.steps), "seed": str(self.seed),
                "model": self.engine.identity}
        write_checked(tensors, meta, path)

    @classmethod
    def load(cls, engine, tokenizer, path: str, sampling: Sampling = Sampling(),
             seed: Optional[int] = None) -> "Conversation":
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
        conv = cls(engine, tokenizer, sampling, saved_seed if seed is None else seed)
        stacked = cache_from_tensors(tensors, engine.model, path, allowed_extra=("pending",))
        if stacked["next_pos"].shape != (1,):
            raise UserError(f"{path}: holds a batch of {stacked['next_pos'].shape[0]} "
                            "conversations; perspective-infer resumes one")
        conv.state = EngineState.from_cache(stacked)
        conv.pending = pending.astype(int).tolist()
        conv.steps = steps
        return conv


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
