"""The chat template of a model directory: Jinja text that formats a conversation
into the prompt the model continues, as Hugging Face's `chat_template` does.

    text, source = resolve_chat_template("chatml-tools" | "path/to/t.jinja" | None)
    entry = write_chat_template(out, text, source)    # at export; the manifest's entry
    text, where = read_chat_template(model_dir, manifest)   # checked against its sha256

A template sees `messages` (OpenAI-style dicts: role, content, tool_calls,
tool_call_id, name), `tools` (OpenAI tool definitions or None), `tool_choice`,
`add_generation_prompt`, `bos_token` and `eos_token`; the `tojson` filter and the
`raise_exception(message)` and `strftime_now(format)` helpers are available. It runs
in Jinja's immutable sandbox (`environment`), so a template file cannot reach
Python objects or change its arguments. Built-ins (`BUILTIN_TEMPLATES`):
"chatml-tools" (the default) — ChatML turns, tools listed in a system turn, calls
written `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` — and "plain"
(`role: content` lines, for base models; tools are not shown).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Optional

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from perspective_jax.errors import UserError
from perspective_jax.fileio import naming
from perspective_jax.modeldir import format as md
from perspective_jax.modeldir.format import CHAT_TEMPLATE_FILE  # noqa: F401  (re-exported)
from perspective_jax.modeldir.manifest import verified_path

FROM_FILE = "file"     # the manifest's "source" of a template given as a file at export
NO_TEMPLATE = "built-in default (the model directory has none)"

_CHATML_TOOLS = r"""{{- bos_token }}
{%- set has_system = messages and messages[0].role == 'system' %}
{%- if tools and tool_choice != 'none' %}
    {{- '<|im_start|>system\n' }}
    {%- if has_system %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- 'You can call functions. They are listed below as JSON, one per line:\n<tools>\n' }}
    {%- for tool in tools %}
        {{- (tool | tojson) + '\n' }}
    {%- endfor %}
    {{- '</tools>\nTo call a function, answer with one block per call:\n' }}
    {{- '<tool_call>{"name": <function-name>, "arguments": <arguments-json-object>}</tool_call>' }}
    {%- if tool_choice == 'required' %}
        {{- '\nYou must call at least one function.' }}
    {%- elif tool_choice is mapping and tool_choice.function is defined %}
        {{- '\nYou must call the function ' + tool_choice.function.name + '.' }}
    {%- endif %}
    {{- '<|im_end|>\n' }}
{%- elif has_system %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\n' + message.content }}
        {%- for call in message.tool_calls or [] %}
            {%- set fn = call.function if call.function is defined else call %}
            {%- if message.content or not loop.first %}
                {{- '\n' }}
            {%- endif %}
            {{- '<tool_call>{"name": ' + (fn.name | tojson) + ', "arguments": ' }}
            {%- if fn.arguments is string %}
                {{- fn.arguments }}
            {%- else %}
                {{- fn.arguments | tojson }}
            {%- endif %}
            {{- '}</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>tool\n<tool_response' }}
        {%- if message.tool_call_id %}
            {{- ' id=' + (message.tool_call_id | tojson) }}
        {%- endif %}
        {%- if message.name %}
            {{- ' name=' + (message.name | tojson) }}
        {%- endif %}
        {{- '>\n' + message.content + '\n</tool_response><|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

_PLAIN = r"""{{- bos_token }}
{%- for message in messages %}
    {{- message.role + ': ' + message.content + '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- 'assistant:' }}
{%- endif %}
"""

BUILTIN_TEMPLATES: dict[str, str] = {"chatml-tools": _CHATML_TOOLS, "plain": _PLAIN}
DEFAULT_TEMPLATE = "chatml-tools"


class ChatTemplateError(UserError):
    """A chat template that does not compile, or fails while formatting a conversation."""


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """JSON text of `value` (Hugging Face's `tojson`: no HTML escaping, Unicode kept)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.cache
def environment() -> ImmutableSandboxedEnvironment:
    """The one Jinja environment every chat template compiles in: immutable sandbox,
    trim_blocks and lstrip_blocks, loop controls, `tojson`, `raise_exception`,
    `strftime_now` (as Hugging Face's chat templates expect)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def compile_template(text: str, where: str) -> jinja2.Template:
    """`text` compiled in `environment()`; a syntax error is a one-line
    ChatTemplateError '<where>: line N: <Jinja's message>'."""
    try:
        return environment().from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{where}: line {e.lineno}: {one_line(e.message)}; fix the "
                                "template") from None


def resolve_chat_template(choice: Optional[str]) -> tuple[str, str]:
    """(template text, manifest source) for --chat-template `choice`: a built-in name,
    a path to a UTF-8 Jinja file that compiles (source FROM_FILE), or None (the
    default). Cheap: called before any heavy work of an export."""
    choice = DEFAULT_TEMPLATE if choice is None else choice
    if choice in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[choice], choice
    where = f"--chat-template {choice}"
    if not os.path.isfile(choice):
        raise UserError(f"{where}: neither a built-in template "
                        f"({', '.join(BUILTIN_TEMPLATES)}) nor a template file")
    try:
        with open(choice, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise UserError(f"{where}: cannot read it ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{where}: line {line}: not valid UTF-8 (byte {raw[e.start]:#04x} at "
                        f"offset {e.start}); save the template as UTF-8") from None
    if not text.strip():
        raise UserError(f"{where}: the template file is empty")
    compile_template(text, where)
    return text, FROM_FILE


def write_chat_template(out: str, text: str, source: str) -> dict:
    """Write CHAT_TEMPLATE_FILE into the model directory `out` (byte for byte); returns
    the manifest's entry for it."""
    path = os.path.join(out, md.CHAT_TEMPLATE_FILE)
    with naming(path), open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
    return {"file": md.CHAT_TEMPLATE_FILE, "source": source}


def read_chat_template(model_dir: str, manifest: dict) -> tuple[str, str]:
    """(template text, where it came from) of a model directory, its file checked
    against the manifest's sha256 (a one-line ModelDirError naming it otherwise); a
    directory exported without one gets the default built-in (source NO_TEMPLATE)."""
    entry = manifest.get(md.CHAT_TEMPLATE_KEY)
    if entry is None:
        return BUILTIN_TEMPLATES[DEFAULT_TEMPLATE], NO_TEMPLATE
    path = verified_path(model_dir, manifest, entry["file"])
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise md.ModelDirError(f"{path} is not valid UTF-8; re-run perspective-export "
                               "--chat-template with a UTF-8 template") from None
    source = entry["source"]
    origin = "a template file" if source == FROM_FILE else f"built-in {source}"
    return text, f"{path} ({origin})"
