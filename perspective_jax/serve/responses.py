"""OpenAI response bodies and stream chunks built from the scheduler's events.

    out = Collected(n_choices)            # feed it every event of one request
    completion_body(...), chat_body(...)  # the non-streamed answers
    CompletionChunks / ChatChunks         # the streamed ones: one SSE chunk per event

Streams follow what the official client expects: one `id` on every chunk, the role
in each choice's first chat delta, `finish_reason` on its last chunk, a usage chunk
with empty `choices` when `stream_options.include_usage` is set, then `[DONE]`
(written by the app). Tool calls (`<tool_call>{…}</tool_call>` in the model's
output, `serve.chat`) become `tool_calls` — whole in a message, one delta per call
in a stream — and the finish reason `tool_calls`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Optional

from perspective_jax.serve import tokens as T
from perspective_jax.serve.chat import ToolCallStream, parse_tool_calls
from perspective_jax.serve.jobs import Done, Finished, Prompt, Token


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(done: Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


class Collected:
    """Everything one request produced, per choice."""

    def __init__(self, n_choices: int):
        self.tokens: list[list[Token]] = [[] for _ in range(n_choices)]
        self.finished: dict[int, Finished] = {}
        self.prompts: dict[int, Prompt] = {}
        self.done: Optional[Done] = None

    def add(self, ev) -> None:
        if isinstance(ev, Token):
            self.tokens[ev.choice].append(ev)
        elif isinstance(ev, Finished):
            self.finished[ev.choice] = ev
        elif isinstance(ev, Prompt):
            self.prompts[ev.prompt] = ev
        elif isinstance(ev, Done):
            self.done = ev


def _extension(toks: list, wanted: bool) -> Optional[dict]:
    if not wanted:
        return None
    return {"confidence": [t.confidence for t in toks], "mpd": [t.mpd for t in toks]}


def _whole(rid: str, kind: str, created: int, model: str, choices: list, toks_of: list,
           wanted: bool, done: Done) -> dict:
    """A non-streamed body: the choices (each with the Perspective extension when
    `wanted`, from its tokens `toks_of[i]`) and the usage."""
    for choice, toks in zip(choices, toks_of):
        ext = _extension(toks, wanted)
        if ext:
            choice["perspective"] = ext
    return {"id": rid, "object": kind, "created": created, "model": model,
            "choices": choices, "usage": usage(done)}


# ---------------------------------------------------------------- completions
def completion_logprobs(tokenizer, prompt: Optional[Prompt], toks: list, offset0: int = 0):
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs (dicts) and
    text_offset, the prompt's first when echoed."""
    ids = (list(prompt.ids) if prompt else []) + [t.id for t in toks]
    lps = (list(prompt.logprobs) if prompt else []) + [t.logprob for t in toks]
    tops = (list(prompt.top) if prompt else []) + [t.top for t in toks]
    offsets, text = [], ""
    for i in range(len(ids)):
        offsets.append(offset0 + len(text))
        text = T.decode(tokenizer, ids[: i + 1])
    return {"tokens": [T.token_text(tokenizer, i) for i in ids], "token_logprobs": lps,
            "top_logprobs": [None if top is None else
                             {T.token_text(tokenizer, c.id): c.logprob for c in top}
                             for top in tops],
            "text_offset": offsets}


def completion_body(rid: str, model: str, created: int, req, out: Collected, tokenizer,
                    prompt_texts: list) -> dict:
    d, choices = req.decoding, []
    for index, toks in enumerate(out.tokens):
        p = index // d.n
        fin = out.finished[index]
        text = (prompt_texts[p] if d.echo else "") + fin.text
        choice = {"index": index, "text": text, "logprobs": None,
                  "finish_reason": fin.reason}
        if d.logprobs is not None:
            choice["logprobs"] = completion_logprobs(
                tokenizer, out.prompts.get(p) if d.echo else None, toks)
        choices.append(choice)
    return _whole(rid, "text_completion", created, model, choices, out.tokens,
                  d.confidence, out.done)


class _Chunks:
    """A stream's payloads (dicts), built event by event (`on`); one id and time."""

    def __init__(self, rid: str, model: str, req, tokenizer):
        self.rid, self.model, self.req, self.tokenizer = rid, model, req, tokenizer
        self.created = int(time.time())


class CompletionChunks(_Chunks):
    """SSE payloads of a streamed completion."""

    def __init__(self, rid: str, model: str, req, tokenizer, prompt_texts: list):
        super().__init__(rid, model, req, tokenizer)
        self.prompt_texts = prompt_texts

    def _chunk(self, choices: list, **extra) -> dict:
        return {"id": self.rid, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": choices, **extra}

    def on(self, ev) -> list:
        d = self.req.decoding
        if isinstance(ev, Prompt):                 # echo: the prompt text first
            out = []
            for c in range(d.n):
                lp = (completion_logprobs(self.tokenizer, ev, []) if d.logprobs is not None
                      else None)
                out.append(self._chunk([{"index": ev.prompt * d.n + c,
                                         "text": self.prompt_texts[ev.prompt],
                                         "logprobs": lp, "finish_reason": None}]))
            return out
        if isinstance(ev, Token):
            if not ev.text and d.logprobs is None and not d.confidence:
                return []
            choice = {"index": ev.choice, "text": ev.text, "finish_reason": None,
                      "logprobs": (completion_logprobs(self.tokenizer, None, [ev])
                                   if d.logprobs is not None else None)}
            ext = _extension([ev], d.confidence)
            if ext:
                choice["perspective"] = ext
            return [self._chunk([choice])]
        if isinstance(ev, Finished):
            return [self._chunk([{"index": ev.choice, "text": "", "logprobs": None,
                                  "finish_reason": ev.reason}])]
        if isinstance(ev, Done) and self.req.include_usage:
            return [self._chunk([], usage=usage(ev))]
        return []


# ---------------------------------------------------------------- chat
def chat_logprobs(tokenizer, toks: list) -> dict:
    def entry(i: int, lp: float) -> dict:
        return {"token": T.token_text(tokenizer, i), "logprob": lp,
                "bytes": T.token_bytes(tokenizer, i)}
    return {"content": [{**entry(t.id, t.logprob),
                         "top_logprobs": [entry(c.id, c.logprob) for c in t.top or ()]}
                        for t in toks]}


def tool_call_json(call, index: Optional[int] = None) -> dict:
    """A ToolCall as a message's `tool_calls` entry, or (with `index`) a stream delta's."""
    body = call.as_openai()
    return body if index is None else {"index": index, **body}


def chat_body(rid: str, model: str, created: int, req, out: Collected, tokenizer,
              tools_on: bool) -> dict:
    d, choices = req.decoding, []
    for index, toks in enumerate(out.tokens):
        fin = out.finished[index]
        content, calls = parse_tool_calls(fin.text) if tools_on else (fin.text, [])
        message = {"role": "assistant", "content": content if content or not calls else None}
        if calls:
            message["tool_calls"] = [tool_call_json(c) for c in calls]
        choice = {"index": index, "message": message,
                  "logprobs": chat_logprobs(tokenizer, toks) if d.logprobs is not None
                  else None,
                  "finish_reason": "tool_calls" if calls else fin.reason}
        choices.append(choice)
    return _whole(rid, "chat.completion", created, model, choices, out.tokens,
                  d.confidence, out.done)


class ChatChunks(_Chunks):
    """SSE payloads of a streamed chat completion."""

    def __init__(self, rid: str, model: str, req, tokenizer, tools_on: bool):
        super().__init__(rid, model, req, tokenizer)
        n = req.decoding.n
        self.tools = [ToolCallStream() if tools_on else None for _ in range(n)]
        self.calls = [0] * n

    def _chunk(self, index: int, delta: dict, finish=None, logprobs=None, ext=None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs,
                  "finish_reason": finish}
        if ext:
            choice["perspective"] = ext
        return {"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [choice]}

    def start(self) -> list:
        return [self._chunk(i, {"role": "assistant", "content": ""})
                for i in range(self.req.decoding.n)]

    def _text_events(self, index: int, text: str, final: bool) -> list:
        stream = self.tools[index]
        if stream is None:
            return [("text", text)] if text else []
        return stream.push(text) + (stream.finish() if final else [])

    def _deltas(self, index: int, events: list) -> list:
        out = []
        for kind, value in events:
            if kind == "text":
                if value:
                    out.append({"content": value})
            else:
                out.append({"tool_calls": [tool_call_json(value, self.calls[index])]})
                self.calls[index] += 1
        return out

    def on(self, ev) -> list:
        d = self.req.decoding
        if isinstance(ev, Token):
            deltas = self._deltas(ev.choice, self._text_events(ev.choice, ev.text, False))
            lp = chat_logprobs(self.tokenizer, [ev]) if d.logprobs is not None else None
            ext = _extension([ev], d.confidence)
            if not deltas and (lp or ext):
                deltas = [{"content": ""}]
            return [self._chunk(ev.choice, delta, logprobs=lp if k == 0 else None,
                                ext=ext if k == 0 else None)
                    for k, delta in enumerate(deltas)]
        if isinstance(ev, Finished):
            chunks = [self._chunk(ev.choice, delta) for delta in
                      self._deltas(ev.choice, self._text_events(ev.choice, "", True))]
            reason = "tool_calls" if self.calls[ev.choice] else ev.reason
            return chunks + [self._chunk(ev.choice, {}, finish=reason)]
        if isinstance(ev, Done) and self.req.include_usage:
            return [{"id": self.rid, "object": "chat.completion.chunk",
                     "created": self.created, "model": self.model, "choices": [],
                     "usage": usage(ev)}]
        return []


def sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()
