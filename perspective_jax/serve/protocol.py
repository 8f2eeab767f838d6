"""OpenAI request bodies → checked, typed requests (a bad field is a 400 naming it).

    req = completion_request(body, limits)     # /v1/completions
    req = chat_request(body, limits)           # /v1/chat/completions

Fields: `model`, `max_tokens` (chat also `max_completion_tokens`), `temperature`,
`top_p`, `top_k` (an extension vLLM also takes; 0 or −1 = off), `seed`, `stop`
(string or list), `n`, `stream`, `stream_options.include_usage`, `logprobs`
(completions: the number of top log-probabilities per token; chat: a bool with
`top_logprobs`), `echo` (completions), and the Perspective extension object
`perspective: {"mpd": bool, "confidence": bool, "safety": bool, "memory": bool,
"adapter": bool}` that standard clients never send (`safety`: the safety
projection, as `Limits.safety` allows; `memory`: with `mpd`, consult the server's
memory where the perspectives find no majority; `adapter`: decode with the server's
adapter, on by default when it has one — false for the plain model).
Sampling parameters that this server cannot honour (penalties, `logit_bias`,
`best_of` > 1, `suffix`, a `response_format` other than text) are refused, never
ignored. Completions' `prompt`: a string, a list of strings, a list of token ids
or a list of token-id lists.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Union

from perspective_jax.config.choices import TEMPERATURE_RANGE
from perspective_jax.errors import UserError
from perspective_jax.model.sampling import Sampling
from perspective_jax.serve.api_errors import APIError, bad_field

MAX_LOGPROBS = 20          # top log-probabilities per token, as OpenAI
MAX_STOPS = 16
ROLES = ("system", "developer", "user", "assistant", "tool")
SEED_MODULUS = 2 ** 32     # seeds are taken mod 2^32 (perspective-infer's --seed range)
# the safety projection: the model has no polytope / requests may ask for it / always on
SAFETY_MODES = ("unavailable", "optional", "enforced")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the server allows (perspective-serve flags)."""

    max_tokens: int = 2048             # most tokens one choice may generate
    default_max_tokens: int = 256      # chat's default (completions: 16, as OpenAI)
    max_n: int = 16
    vocab_size: int = 0                # the tokenizer's piece count (token-id prompts)
    safety: str = "unavailable"        # SAFETY_MODES (perspective-serve --safety: enforced)
    memory: bool = False               # a memory is loaded (perspective-serve --memory)
    adapter: bool = False              # an adapter is attached (perspective-serve --adapter)

    def __post_init__(self):
        if self.safety not in SAFETY_MODES:
            raise UserError(f"Limits.safety {self.safety!r}: use one of {SAFETY_MODES}")


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How to generate one request's choices."""

    max_tokens: int
    sampling: Sampling
    seed: Optional[int]                # None: a fresh random seed
    stop: tuple = ()
    n: int = 1
    logprobs: Optional[int] = None     # top log-probabilities per token; None = off
    echo: bool = False
    mpd: bool = False                  # Perspective extension
    confidence: bool = False
    safety: bool = False               # the safety projection (infer.safety_guard)
    memory: bool = False               # consult the server's memory where MPD is unsure
    adapter: bool = False              # decode with the server's adapter (serve.adapter)


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: tuple                     # each a str or a tuple of token ids
    decoding: Decoding
    stream: bool = False
    include_usage: bool = False


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple                    # dicts: role, content (str), name, tool_calls, …
    tools: Optional[tuple]
    tool_choice: Any
    decoding: Decoding
    stream: bool = False
    include_usage: bool = False


# ---------------------------------------------------------------- field readers
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad_field(key, f"must be a number, got {v!r}")
    if not lo <= v <= hi:
        raise bad_field(key, f"must lie in [{lo:g}, {hi:g}], got {v!r}")
    return float(v)


def _integer(body: dict, key: str, default, lo: int, hi: int):
    v = body.get(key)
    if v is None:
        return default
    if not _is_int(v):
        raise bad_field(key, f"must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise bad_field(key, f"must lie in [{lo}, {hi}], got {v}")
    return v


def _boolean(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_field(key, f"must be true or false, got {v!r}")
    return v


def _model(body: dict) -> str:
    v = body.get("model")
    if not isinstance(v, str) or not v:
        raise bad_field("model", "required: the model id (GET /v1/models lists it)")
    return v


def _stop(body: dict) -> tuple:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad_field("stop", "must be a string or a list of strings")
    if len(items) > MAX_STOPS:
        raise bad_field("stop", f"at most {MAX_STOPS} stop strings, got {len(items)}")
    return tuple(s for s in items if s)


def _refuse_unsupported(body: dict) -> None:
    for key in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        v = body.get(key)
        if v not in (None, 0, 0.0) and not (key == "repetition_penalty" and v == 1):
            raise bad_field(key, "is not supported by this server (leave it unset or 0)")
    if body.get("logit_bias"):
        raise bad_field("logit_bias", "is not supported by this server")
    if body.get("best_of") not in (None, 1):
        raise bad_field("best_of", "is not supported by this server (use n)")
    if body.get("suffix") not in (None, ""):
        raise bad_field("suffix", "is not supported by this server")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad_field("response_format", "only {\"type\": \"text\"} is supported")


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _boolean(body, "stream")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise bad_field("stream_options", "must be an object")
    if not stream:
        raise bad_field("stream_options", "is only allowed with stream=true")
    return stream, _boolean(opts, "include_usage")


EXTENSION_KEYS = ("mpd", "confidence", "safety", "memory", "adapter")


def _adapter(ext: dict, has_adapter: bool) -> bool:
    """`perspective.adapter`: on by default on a server with an adapter; asking for it
    on a server without one is a 400."""
    where, asked = "perspective.adapter", ext.get("adapter")
    if asked is None:
        return has_adapter
    if not isinstance(asked, bool):
        raise bad_field(where, f"must be true or false, got {asked!r}")
    if asked and not has_adapter:
        raise bad_field(where, "this server has no adapter (start it with perspective-serve "
                               "--adapter FILE, made by perspective-adapt)")
    return asked


def _extension(body: dict, safety_mode: str, has_memory: bool = False,
               has_adapter: bool = False) -> tuple[bool, bool, bool, bool, bool]:
    """(mpd, confidence, safety, memory, adapter) of the `perspective` object; safety
    as the server allows: always on when enforced, a 400 when asked of a model
    without a polytope; memory only with mpd and on a server started with --memory;
    adapter as `_adapter`."""
    ext = body.get("perspective")
    if ext is None:
        ext = {}
    if not isinstance(ext, dict):
        raise bad_field("perspective", "must be an object such as {\"mpd\": true}")
    unknown = sorted(set(ext) - set(EXTENSION_KEYS))
    if unknown:
        raise bad_field("perspective", f"unknown key {unknown[0]!r} (known: "
                                       f"{', '.join(EXTENSION_KEYS)})")
    where = "perspective.safety"
    asked = ext.get("safety")
    if asked is not None and not isinstance(asked, bool):
        raise bad_field(where, f"must be true or false, got {asked!r}")
    if asked and safety_mode == "unavailable":
        raise bad_field(where, "this model has no safety polytope (build one with "
                               "perspective-train --stage safety and export it)")
    if asked is False and safety_mode == "enforced":
        raise bad_field(where, "this server enforces the safety projection "
                               "(perspective-serve --safety); it cannot be turned off")
    mpd, memory = _boolean(ext, "mpd"), _boolean(ext, "memory")
    if memory and not has_memory:
        raise bad_field("perspective.memory", "this server has no memory (start it with "
                                              "perspective-serve --memory FILE)")
    if memory and not mpd:
        raise bad_field("perspective.memory", "the memory is consulted when MPD's "
                                              "perspectives disagree; set perspective.mpd "
                                              "to true as well")
    return (mpd, _boolean(ext, "confidence"), safety_mode == "enforced" or bool(asked),
            memory, _adapter(ext, has_adapter))


def _decoding(body: dict, limits: Limits, default_max: int, max_tokens_key: str,
              logprobs: Optional[int], echo: bool) -> Decoding:
    _refuse_unsupported(body)
    lo = 0 if echo else 1
    max_tokens = _integer(body, max_tokens_key, default_max, lo, 2 ** 31 - 1)
    if max_tokens > limits.max_tokens:
        raise bad_field(max_tokens_key, f"{max_tokens} is more than this server allows "
                                        f"({limits.max_tokens}, perspective-serve --max-tokens-limit)")
    temperature = _number(body, "temperature", 1.0, *TEMPERATURE_RANGE)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise bad_field("top_p", "must be > 0")
    top_k = _integer(body, "top_k", 0, -1, 2 ** 31 - 1)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise bad_field("seed", f"must be an integer, got {seed!r}")
    n = _integer(body, "n", 1, 1, limits.max_n)
    mpd, confidence, safety, memory, adapter = _extension(body, limits.safety, limits.memory,
                                                          limits.adapter)
    return Decoding(max_tokens=max_tokens,
                    sampling=Sampling(temperature=temperature, top_k=max(top_k, 0), top_p=top_p),
                    seed=None if seed is None else seed % SEED_MODULUS, stop=_stop(body), n=n,
                    logprobs=logprobs, echo=echo, mpd=mpd, confidence=confidence,
                    safety=safety, memory=memory, adapter=adapter)


def _check_body(body) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


# ---------------------------------------------------------------- completions
def _prompts(body: dict, vocab_size: int) -> tuple:
    v = body.get("prompt")
    if v is None:
        raise bad_field("prompt", "required: a string, a list of strings or token ids")

    def ids(seq) -> tuple:
        if not seq:
            raise bad_field("prompt", "a token-id prompt is empty")
        if not all(_is_int(t) and 0 <= t < vocab_size for t in seq):
            raise bad_field("prompt", f"token ids must be integers in [0, {vocab_size})")
        return tuple(seq)

    if isinstance(v, str):
        items: list[Union[str, tuple]] = [v]
    elif isinstance(v, list) and v and all(isinstance(p, str) for p in v):
        items = list(v)
    elif isinstance(v, list) and v and all(_is_int(t) for t in v):
        items = [ids(v)]
    elif isinstance(v, list) and v and all(isinstance(p, list) for p in v):
        items = [ids(p) for p in v]
    else:
        raise bad_field("prompt", "must be a string, a list of strings, a list of token "
                                  "ids or a list of token-id lists (and not empty)")
    if any(isinstance(p, str) and not p for p in items):
        raise bad_field("prompt", "is empty; give some text to continue from")
    return tuple(items)


def completion_request(body, limits: Limits) -> CompletionRequest:
    body = _check_body(body)
    model = _model(body)
    prompts = _prompts(body, limits.vocab_size)
    logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    echo = _boolean(body, "echo")
    decoding = _decoding(body, limits, 16, "max_tokens", logprobs, echo)
    stream, usage = _stream(body)
    return CompletionRequest(model, prompts, decoding, stream, usage)


# ---------------------------------------------------------------- chat
def _content(message: dict, i: int) -> str:
    """A message's content as text (a string, null, or a list of text parts)."""
    v = message.get("content")
    where = f"messages[{i}].content"
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        parts = []
        for part in v:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise bad_field(where, "only text parts ({\"type\": \"text\", \"text\": …}) "
                                       "are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_field(where, "must be a string, null or a list of text parts")


def _messages(body: dict) -> tuple:
    v = body.get("messages")
    if not isinstance(v, list) or not v:
        raise bad_field("messages", "required: a non-empty list of messages")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise bad_field(f"messages[{i}]", "must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise bad_field(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, "
                                                   f"got {role!r}")
        msg = {"role": "system" if role == "developer" else role, "content": _content(m, i)}
        for key in ("name", "tool_call_id"):
            if m.get(key) is not None:
                if not isinstance(m[key], str):
                    raise bad_field(f"messages[{i}].{key}", "must be a string")
                msg[key] = m[key]
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                raise bad_field(f"messages[{i}].tool_calls", "must be a list, on an "
                                                             "assistant message")
            msg["tool_calls"] = [_tool_call(c, f"messages[{i}].tool_calls[{j}]")
                                 for j, c in enumerate(calls)]
        out.append(msg)
    return tuple(out)


def _tool_call(call, where: str) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad_field(where, "must be {\"type\": \"function\", \"function\": {\"name\", "
                               "\"arguments\"}}")
    args = fn.get("arguments", "{}")
    if not isinstance(args, str):
        raise bad_field(f"{where}.function.arguments", "must be a JSON string")
    return {"id": call.get("id"), "type": "function",
            "function": {"name": fn["name"], "arguments": args}}


def _tools(body: dict) -> tuple[Optional[tuple], Any]:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad_field("tools", "must be a list of tools")
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(t, dict) or t.get("type") != "function" or \
                    not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise bad_field(f"tools[{i}]", "must be {\"type\": \"function\", "
                                               "\"function\": {\"name\": …, …}}")
        tools = tuple(tools) or None
    choice = body.get("tool_choice")
    if choice is not None:
        named = (isinstance(choice, dict) and choice.get("type") == "function"
                 and isinstance(choice.get("function"), dict)
                 and isinstance(choice["function"].get("name"), str))
        if choice not in ("none", "auto", "required") and not named:
            raise bad_field("tool_choice", "must be \"none\", \"auto\", \"required\" or "
                                           "{\"type\": \"function\", \"function\": {\"name\"}}")
        if named and not any(t["function"]["name"] == choice["function"]["name"]
                             for t in tools or ()):
            raise bad_field("tool_choice", f"names {choice['function']['name']!r}, which "
                                           "is not among the tools")
    return tools, choice


def chat_request(body, limits: Limits) -> ChatRequest:
    body = _check_body(body)
    model = _model(body)
    messages = _messages(body)
    tools, tool_choice = _tools(body)
    want = _boolean(body, "logprobs")
    top = _integer(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
    if body.get("top_logprobs") is not None and not want:
        raise bad_field("top_logprobs", "needs logprobs=true")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    decoding = _decoding(body, limits, limits.default_max_tokens, key,
                         top if want else None, False)
    stream, usage = _stream(body)
    return ChatRequest(model, messages, tools, tool_choice, decoding, stream, usage)
