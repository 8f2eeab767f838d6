"""Chat templates: the built-ins format conversations (tools, tool calls, tool
results, generation prompt) exactly as written out by hand; a template's own errors
are one-line ChatTemplateErrors naming its line; the sandbox holds."""

import pytest

from perspective_jax.errors import UserError
from perspective_jax.modeldir.chat_template import BUILTIN_TEMPLATES, DEFAULT_TEMPLATE
from perspective_jax.serve.chat import ChatTemplate, ChatTemplateError, parse_tool_calls

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOLS_JSON = ('{"type": "function", "function": {"name": "get_weather", "description": '
              '"Weather now", "parameters": {"type": "object", "properties": {"city": '
              '{"type": "string"}}}}}')
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Zürich"}}</tool_call>'
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "assistant", "content": "18 C."},
]


@pytest.fixture
def chatml():
    return ChatTemplate(BUILTIN_TEMPLATES["chatml-tools"])


def test_chatml_without_tools(chatml):
    assert DEFAULT_TEMPLATE == "chatml-tools"
    got = chatml.render([{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hi"}])
    assert got == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                   "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    got = chatml.render([{"role": "user", "content": "Hi"}], add_generation_prompt=False,
                        bos_token="<s>")
    assert got == "<s><|im_start|>user\nHi<|im_end|>\n"


def test_chatml_with_tools_calls_and_results(chatml):
    got = chatml.render(CONVERSATION, tools=TOOLS, tool_choice="auto")
    assert got == (
        "<|im_start|>system\nBe brief.\n\n"
        "You can call functions. They are listed below as JSON, one per line:\n"
        f"<tools>\n{TOOLS_JSON}\n</tools>\n"
        "To call a function, answer with one block per call:\n"
        '<tool_call>{"name": <function-name>, "arguments": <arguments-json-object>}'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\nWeather in Zürich?<|im_end|>\n"
        f"<|im_start|>assistant\n{CALL}<|im_end|>\n"
        '<|im_start|>tool\n<tool_response id="call_1">\n18 C\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n18 C.<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_chatml_tool_choice(chatml):
    user = [{"role": "user", "content": "Hi"}]
    assert chatml.render(user, tools=TOOLS, tool_choice="none") == chatml.render(user)
    assert "You must call at least one function.<|im_end|>" in chatml.render(
        user, tools=TOOLS, tool_choice="required")
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert "You must call the function get_weather.<|im_end|>" in chatml.render(
        user, tools=TOOLS, tool_choice=named)


def test_rendered_calls_parse_back_to_themselves(chatml):
    """An assistant turn with text and two calls (arguments as a JSON string and as an
    object), and a tool result with a name: what the model would have written."""
    turn = {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "a", "function": {"name": "f", "arguments": '{"x": [1, {"y": "}"}]}'}},
        {"id": "b", "function": {"name": "g", "arguments": {"z": "é"}}}]}
    got = chatml.render([turn, {"role": "tool", "tool_call_id": "b", "name": "g",
                                "content": "ok"}], add_generation_prompt=False)
    body = got.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert body == ('Checking.\n<tool_call>{"name": "f", "arguments": {"x": [1, {"y": "}"}]}}'
                    '</tool_call>\n<tool_call>{"name": "g", "arguments": {"z": "é"}}</tool_call>')
    content, calls = parse_tool_calls(body, new_id=iter(["a", "b"]).__next__)
    assert content == "Checking."
    assert [tuple(c) for c in calls] == [("a", "f", '{"x": [1, {"y": "}"}]}'),
                                         ("b", "g", '{"z": "é"}')]
    assert '<tool_response id="b" name="g">\nok\n</tool_response>' in got


def test_plain_template_and_content_parts():
    plain = ChatTemplate(BUILTIN_TEMPLATES["plain"])
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hello, "},
                                             {"type": "text", "text": "there"}]}]
    assert plain.render(messages, tools=TOOLS) == ("system: Be brief.\nuser: Hello, there\n"
                                                   "assistant:")
    with pytest.raises(ChatTemplateError, match=r"messages\[0\]: content part of type "
                                                "'image_url' is not supported"):
        plain.render([{"role": "user", "content": [{"type": "image_url"}]}])


def test_hugging_face_style_templates_work():
    """tojson with arguments (no HTML escaping), loop controls, namespace, is string."""
    text = ("{%- set ns = namespace(n=0) %}{%- for m in messages %}"
            "{%- if m.role == 'skip' %}{% continue %}{% endif %}{%- set ns.n = ns.n + 1 %}"
            "{{ m.content | tojson(indent=1) }}{{ eos_token }}{% endfor %}"
            "{{ ns.n }}{{ '<&>' if tools is none }}")
    got = ChatTemplate(text).render([{"role": "user", "content": "a<b>&"},
                                     {"role": "skip", "content": "x"}], eos_token="</s>")
    assert got == '"a<b>&"</s>1<&>'


@pytest.mark.parametrize("text, parts", [
    ("x\n{{ raise_exception('a system message is required') }}",
     ["chat template, line 2: a system message is required"]),
    ("x\n\n{{ messages[0].content + 1 }}", ["line 3", "TypeError"]),
    ("{{ messages[0].nope.deeper }}", ["line 1", "nope"]),
    ("{{ messages.__class__.__mro__ }}", ["unsafe"]),
    ("{{ messages.append(1) }}", ["unsafe"]),
])
def test_a_failing_template_is_one_line_naming_its_line(text, parts):
    with pytest.raises(ChatTemplateError) as err:
        ChatTemplate(text).render([{"role": "user", "content": "hi"}])
    message = str(err.value)
    assert "\n" not in message and all(p in message for p in parts), message
    assert isinstance(err.value, UserError)


def test_a_template_that_does_not_compile_is_one_line():
    with pytest.raises(ChatTemplateError) as err:
        ChatTemplate("ok\n{% for m in messages %}{{ m }}", where="model/chat_template.jinja")
    message = str(err.value)
    assert message.startswith("model/chat_template.jinja: line 2: ") and "\n" not in message
    assert "endfor" in message
