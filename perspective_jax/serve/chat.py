"""Chat formatting for the server: conversations in (a chat template), tool calls out.

    template = ChatTemplate(text)              # compiled once, sandboxed
    prompt = template.render(messages, tools=tools, tool_choice="auto")
    content, calls = parse_tool_calls(completion)          # whole completions
    stream = ToolCallStream()                              # streamed ones
    for delta in deltas: events += stream.push(delta)
    events += stream.finish()                  # ("text", str) | ("tool_call", ToolCall)

A tool call is the block `<tool_call>{"name": NAME, "arguments": {...}}</tool_call>`
(the format the built-in "chatml-tools" template asks for). A block ends at the first
`</tool_call>` after it opens; one whose body is not a JSON object with a string
"name" (and "arguments" an object, a JSON string of one, or absent) stays in the
content as text, as does a block left open at the end. Content is the text around
the blocks, stripped; a stream's text events join to exactly that content.
"""

from __future__ import annotations

import json
import random
import traceback
import uuid
from typing import Callable, NamedTuple, Optional, Union

import jinja2

from perspective_jax.modeldir.chat_template import (ChatTemplateError,  # noqa: F401
                                                    compile_template, one_line)

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class ChatTemplate:
    """A chat template (Jinja text) compiled once; `render` formats a conversation.
    A template that does not compile is a one-line ChatTemplateError naming `where`."""

    def __init__(self, text: str, where: str = "chat template"):
        self.text, self.where = text, where
        self._template = compile_template(text, where)

    def render(self, messages: list[dict], tools: Optional[list[dict]] = None,
               tool_choice=None, add_generation_prompt: bool = True, bos_token: str = "",
               eos_token: str = "") -> str:
        """The prompt text of `messages` (OpenAI chat messages; content None becomes
        "", a list of text parts their joined text). A template that fails here (its
        own `raise_exception`, an undefined value, a type error) is a one-line
        ChatTemplateError."""
        messages = [_plain_message(i, m) for i, m in enumerate(messages)]
        try:
            return self._template.render(
                messages=messages, tools=tools, tool_choice=tool_choice,
                add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                eos_token=eos_token)
        except Exception as e:          # noqa: BLE001 — any failure of the user's template
            line = _template_line(e)
            where = f"{self.where}, line {line}" if line else self.where
            raise ChatTemplateError(f"{where}: {_describe(e)}") from None


def _describe(e: Exception) -> str:
    if isinstance(e, jinja2.TemplateError):
        return one_line(e.message or type(e).__name__)
    return one_line(f"{type(e).__name__}: {e}")


def _template_line(e: Exception) -> Optional[int]:
    """The template line a render error happened at (Jinja rewrites its frames to the
    template's lines, file name '<template>'), or None."""
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
             if f.filename == "<template>"]
    return lines[-1] if lines else None


def _plain_message(i: int, message) -> dict:
    """`message` with its content as text: None → "", [{"type": "text", "text": ...}]
    → the joined text; other content parts are a ChatTemplateError."""
    if not isinstance(message, dict):
        raise ChatTemplateError(f"messages[{i}] is not an object")
    content = message.get("content")
    if content is None:
        return {**message, "content": ""}
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ChatTemplateError(f"messages[{i}]: content part of type {kind!r} is "
                                        "not supported (text parts only)")
            parts.append(part["text"])
        return {**message, "content": "".join(parts)}
    return message


class ToolCall(NamedTuple):
    """One call the model made: `arguments` is JSON text of an object, as OpenAI
    returns it."""

    id: str
    name: str
    arguments: str

    def as_openai(self) -> dict:
        """The call as an OpenAI `tool_calls` entry."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def make_call_id(rng: Optional[random.Random] = None) -> str:
    """'call_' + 24 hex digits: from `rng` when given (reproducible), else uuid4."""
    digits = f"{rng.getrandbits(96):024x}" if rng is not None else uuid.uuid4().hex[:24]
    return "call_" + digits


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _loads(text: str):
    """Strict JSON (no NaN/Infinity); ValueError otherwise."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def call_from_body(body: str, new_id: Callable[[], str]) -> Optional[ToolCall]:
    """The ToolCall a block's body describes, or None when it is malformed."""
    try:
        obj = _loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments")
    if args is None:
        arguments = "{}"
    elif isinstance(args, dict):
        arguments = json.dumps(args, ensure_ascii=False)
    elif isinstance(args, str):
        try:
            if not isinstance(_loads(args), dict):
                return None
        except ValueError:
            return None
        arguments = args
    else:
        return None
    return ToolCall(new_id(), obj["name"], arguments)


def parse_tool_calls(text: str, new_id: Callable[[], str] = make_call_id
                     ) -> tuple[str, list[ToolCall]]:
    """(content without the well-formed tool-call blocks, stripped; the calls in order)."""
    pieces, calls, at = [], [], 0
    while True:
        start = text.find(OPEN, at)
        end = text.find(CLOSE, start + len(OPEN)) if start >= 0 else -1
        if end < 0:                               # no block, or one left open: text
            break
        call = call_from_body(text[start + len(OPEN): end], new_id)
        if call is None:                          # malformed: kept as text
            pieces.append(text[at: end + len(CLOSE)])
        else:
            pieces.append(text[at: start])
            calls.append(call)
        at = end + len(CLOSE)
    pieces.append(text[at:])
    return "".join(pieces).strip(), calls


Event = Union[tuple[str, str], tuple[str, ToolCall]]   # ("text", s) | ("tool_call", call)


def _partial_open(text: str) -> int:
    """Length of the longest end of `text` that begins OPEN (shorter than OPEN)."""
    for k in range(min(len(text), len(OPEN) - 1), 0, -1):
        if text.endswith(OPEN[:k]):
            return k
    return 0


class ToolCallStream:
    """`parse_tool_calls` for text that arrives in pieces: `push(delta)` returns the
    events it completes, `finish()` the rest. Text that may begin a block (a partial
    `<tool_call>` at the end) or lies in an open block is held back, so no text event
    holds any part of a well-formed block; leading and trailing whitespace of the
    content is never sent. The text events join to parse_tool_calls' content and the
    calls are its calls, however the text is split."""

    def __init__(self, new_id: Callable[[], str] = make_call_id):
        self._new_id = new_id
        self._held = ""        # a possible start of OPEN, or an open block (starts with OPEN)
        self._in_block = False
        self._scanned = 0      # in a block: CLOSE does not begin before this offset
        self._started = False  # some text was sent (leading whitespace is dropped before)
        self._space = ""       # trailing whitespace held until more text follows

    def push(self, delta: str) -> list[Event]:
        events: list[Event] = []
        self._held += delta
        while True:
            if self._in_block:
                end = self._held.find(CLOSE, self._scanned)
                if end < 0:
                    self._scanned = max(len(OPEN), len(self._held) - len(CLOSE) + 1)
                    return events
                block, self._held = (self._held[: end + len(CLOSE)],
                                     self._held[end + len(CLOSE):])
                self._in_block = False
                call = call_from_body(block[len(OPEN): end], self._new_id)
                if call is None:
                    self._text(block, events)
                else:
                    events.append(("tool_call", call))
            else:
                start = self._held.find(OPEN)
                if start < 0:
                    keep = len(self._held) - _partial_open(self._held)
                    self._text(self._held[:keep], events)
                    self._held = self._held[keep:]
                    return events
                self._text(self._held[:start], events)
                self._held = self._held[start:]
                self._in_block, self._scanned = True, len(OPEN)

    def finish(self) -> list[Event]:
        """The held text (a partial tag, an unclosed block) as text; the stream ends."""
        events: list[Event] = []
        self._text(self._held, events)
        self._held, self._in_block, self._space = "", False, ""
        return events

    def _text(self, text: str, events: list) -> None:
        if not self._started:
            text = text.lstrip()
        if not text:
            return
        text = self._space + text
        body = text.rstrip()
        self._space = text[len(body):]
        if body:
            events.append(("text", body))
            self._started = True
