"""The lm-evaluation-harness model "perspective": a model directory scored and
decoded in process by the streaming engine. Importing this module registers it.

    import perspective_jax.evaluate.lm_eval_model          # registers "perspective"
    lm = PerspectiveHarnessLM(model_dir="models/tiny", max_length=None)
    lm_eval.simple_evaluate(model=lm, tasks=["perspective_perplexity"], ...)

model_args: `model_dir` (required), `host_budget_mb`, `device_slots` (the engine's
budgets) and `max_length` (none by default: PDR states and windowed attention carry
any length of context, so a document is scored in one pass; given, contexts are cut
to their last max_length tokens and documents scored in rolling windows, as the
harness's Hugging Face models do). `batch_size` and `device` are accepted and
unused: requests run one at a time on JAX's default device.

* loglikelihood: context and continuation are encoded separately (an empty context
  becomes the tokenizer's EOS id, the token that separates training documents); one
  pass over context + continuation; Σ log p(continuation) by `model.sampling.
  log_probs` (ids the tokenizer lacks excluded), and whether greedy decoding picks
  every continuation token.
* loglikelihood_rolling: EOS, then the document; every document token scored once.
* generate_until: `infer.session.Conversation` at the request's temperature (greedy
  by default), cut at the first `until` string, at most `max_gen_toks` tokens.

A scoring pass is padded at its end to a power of two within the engine's prefill
chunk (the model is causal: padding never changes the positions before it), and a
generation prompt is fed in power-of-two pieces of MIN_PIECE tokens or more, the
rest one token at a time (the decode step), so requests of every length share a
few compiled shapes.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from perspective_jax.errors import UserError
from perspective_jax.infer.engine import StreamingEngine, load_model_tokenizer
from perspective_jax.infer.options import EngineOptions
from perspective_jax.infer.session import Conversation
from perspective_jax.model.sampling import Sampling, log_probs

INSTALL_HINT = "pip install 'perspective-jax[eval]'"
try:
    # lm_eval's own models first: its registry imports them only while it is empty, so
    # registering "perspective" first would hide local-completions and the rest
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:
    raise UserError(f"lm-evaluation-harness is not installed; {INSTALL_HINT}") from None

MODEL_NAME = "perspective"
MIN_PIECE = 16              # the shortest pass of more than one token
DEFAULT_GEN_TOKENS = 256    # max_gen_toks when a task gives none (the harness's default)


def padded_length(n: int, chunk: int) -> int:
    """n tokens padded so the last prefill chunk is a power of two (>= MIN_PIECE,
    <= chunk): full chunks, then the rest rounded up."""
    full, rest = divmod(n, chunk) if n > 0 else (0, 0)
    if rest == 0:
        return n
    return full * chunk + min(chunk, max(MIN_PIECE, 1 << (rest - 1).bit_length()))


def _number(value, name: str, kind, lo):
    """`value` (the model_args or gen_kwargs entry `name`) as a finite `kind` >= lo."""
    try:
        number = kind(value)
        exact = math.isfinite(number) and number == float(value)
    except (TypeError, ValueError, OverflowError):
        exact = False
    if not exact or isinstance(value, bool) or number < lo:
        what = "an integer" if kind is int else "a number"
        raise UserError(f"{name}={value!r}: must be {what} >= {lo}")
    return number


@register_model(MODEL_NAME)
class PerspectiveHarnessLM(LM):
    """An lm_eval LM over a streaming engine (module docstring). `engine` and
    `tokenizer`: objects already built (in-process callers; model_dir then unused)."""

    def __init__(self, model_dir: Optional[str] = None, host_budget_mb=1024.0,
                 device_slots=2, max_length=None, batch_size=None, max_batch_size=None,
                 device=None, engine: Optional[StreamingEngine] = None, tokenizer=None,
                 **unknown):
        super().__init__()
        if unknown:
            raise UserError(f"model_args {', '.join(sorted(unknown))}: unknown to the "
                            f"{MODEL_NAME} model (it takes model_dir, host_budget_mb, "
                            "device_slots, max_length)")
        self.max_length = None if max_length is None else _number(
            max_length, "model_args max_length", int, 2)
        if (engine is None or tokenizer is None) and not model_dir:
            raise UserError(f"the {MODEL_NAME} model needs model_args model_dir=DIR")
        self._owns_engine = engine is None
        self.engine = engine or StreamingEngine(str(model_dir), EngineOptions(
            host_budget_mb=_number(host_budget_mb, "model_args host_budget_mb", float, 0),
            device_slots=_number(device_slots, "model_args device_slots", int, 2)))
        try:
            self.tokenizer = (load_model_tokenizer(str(model_dir), self.engine.manifest)
                              if tokenizer is None else tokenizer)
            eos = getattr(self.tokenizer, "eos_id", None)
            if eos is None or not 0 <= eos < self.engine.model.vocab_size:
                raise UserError("the model's tokenizer has no end-of-sequence id to start "
                                "a text from")
        except BaseException:
            self.close()
            raise
        self.prefix_token_id = int(eos)

    def close(self) -> None:
        """Stop the engine's threads (an engine given by the caller stays open)."""
        if self._owns_engine:
            self.engine.close()

    # ------------------------------------------------------------------ scoring
    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)] if text else []

    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """(Σ log p(continuation | context), whether greedy decoding picks every
        continuation token): one pass over context + continuation[:-1], its first
        tokens dropped beyond max_length. `context` must not be empty."""
        if not continuation:
            return 0.0, True
        if self.max_length is not None and len(continuation) > self.max_length:
            raise UserError(f"a continuation of {len(continuation)} tokens does not fit "
                            f"max_length={self.max_length}")
        feed = (list(context) + list(continuation))[:-1]
        if self.max_length is not None:
            feed = feed[-self.max_length:]
        n = len(feed)
        tokens = np.zeros(padded_length(n, self.engine.prefill_chunk), np.int32)
        tokens[:n] = feed
        logits, _ = self.engine.forward(tokens, self.engine.new_state(), all_logits=True)
        logp = np.asarray(log_probs(logits, self.tokenizer.vocab_size))
        logp = logp[n - len(continuation): n]
        target = np.asarray(continuation)
        picked = logp[np.arange(target.size), target]
        return float(picked.sum(dtype=np.float64)), bool((logp.argmax(-1) == target).all())

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in _progress(requests, "loglikelihood", disable_tqdm):
            context, continuation = req.args
            answer = self.score(self.encode(context) or [self.prefix_token_id],
                                self.encode(continuation))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), answer)
            out.append(answer)
        return out

    def rolling(self, text: str) -> float:
        """log p(text) after EOS: one pass, or rolling windows under max_length."""
        ids = self.encode(text)
        if not ids:
            return 0.0
        if self.max_length is None:
            return self.score([self.prefix_token_id], ids)[0]
        windows = get_rolling_token_windows(token_list=ids, prefix_token=self.prefix_token_id,
                                            max_seq_len=self.max_length, context_len=1)
        return float(sum(self.score(*make_disjoint_window(w))[0] for w in windows))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in _progress(requests, "loglikelihood_rolling", disable_tqdm):
            (text,) = req.args[:1]
            out.append(self.rolling(text))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), out[-1])
        return out

    # ------------------------------------------------------------------ generation
    def generate(self, context: str, gen_kwargs: dict) -> str:
        """One `generate_until` request: until (str or list), max_gen_toks,
        temperature / do_sample, top_k, top_p; other keys are ignored."""
        kw = dict(gen_kwargs or {})
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_tokens = _number(kw.get("max_gen_toks", DEFAULT_GEN_TOKENS),
                             "gen_kwargs max_gen_toks", int, 1)
        temperature = kw.get("temperature")
        if temperature is None:               # sampling asked for without a temperature: 1
            temperature = 1.0 if kw.get("do_sample") else 0.0
        if kw.get("do_sample") is False:
            temperature = 0.0
        sampling = Sampling(temperature=float(temperature), top_k=int(kw.get("top_k") or 0),
                            top_p=float(kw.get("top_p") or 1.0))
        ids = self.encode(context) or [self.prefix_token_id]
        if self.max_length is not None:
            ids = ids[-max(1, self.max_length - max_tokens):]
        conv = Conversation(self.engine, self.tokenizer, sampling, seed=0)
        conv.state = self._prefill(ids[:-1])
        conv.pending = ids[-1:]                 # fed by generate, which samples after it
        return conv.generate("", max_tokens, stop=until, eos_id=self.tokenizer.eos_id)

    def _prefill(self, ids: list[int]):
        """The state after `ids`, fed in power-of-two pieces >= MIN_PIECE (at most a
        prefill chunk), the last few tokens one at a time: few compiled shapes."""
        state = self.engine.new_state()
        start = 0
        while start < len(ids):
            left = len(ids) - start
            size = (min(self.engine.prefill_chunk, 1 << (left.bit_length() - 1))
                    if left >= MIN_PIECE else 1)
            _, state = self.engine.forward(np.asarray(ids[start: start + size], np.int32),
                                           state)
            start += size
        return state

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in _progress(requests, "generate_until", disable_tqdm):
            context, gen_kwargs = req.args[:2]
            out.append(self.generate(context, gen_kwargs))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), out[-1])
        return out


def _progress(requests, what: str, disable: bool):
    from tqdm import tqdm
    return tqdm(requests, desc=f"perspective {what}", disable=disable)
