"""Tool calls in model output: `parse_tool_calls` against hand-written expectations,
and `ToolCallStream` equal to it on many random splits of constructed outputs, with
no part of a well-formed block ever sent as text."""

import itertools
import json
import random
import re

import pytest

from perspective_jax.serve.chat import (ToolCall, ToolCallStream, make_call_id,
                                        parse_tool_calls)


def counter():
    return map("call_{}".format, itertools.count()).__next__


def parse(text):
    content, calls = parse_tool_calls(text, new_id=counter())
    return content, [tuple(c) for c in calls]


def block(body):
    return f"<tool_call>{body}</tool_call>"


def test_calls_are_taken_out_of_the_content_in_order():
    text = ("Let me look.\n" + block('{"name": "a", "arguments": {"q": {"r": [1, 2]}}}')
            + " and " + block(' \n{"name": "b", "arguments": "{\\"s\\": \\"}{\\"}"}\n ')
            + "\nDone. ")
    assert parse(text) == ("Let me look.\n and \nDone.",
                           [("call_0", "a", '{"q": {"r": [1, 2]}}'),
                            ("call_1", "b", '{"s": "}{"}')])
    assert parse(block('{"name": "c"}')) == ("", [("call_0", "c", "{}")])
    assert parse(block('{"name": "d", "arguments": {"t": "<tool_call>é"}}')) == (
        "", [("call_0", "d", '{"t": "<tool_call>é"}')])
    assert parse("no calls here ") == ("no calls here", [])


@pytest.mark.parametrize("body", [
    "not json", "[1, 2]", '{"arguments": {}}', '{"name": 3}', '{"name": ""}',
    '{"name": "f", "arguments": 3}', '{"name": "f", "arguments": "not json"}',
    '{"name": "f", "arguments": "[1]"}', '{"name": "f", "arguments": {"x": NaN}}',
    '{"name": "f", "arguments": {"s": "</tool_call>"}}',   # the block ends at the first close
])
def test_a_malformed_block_stays_in_the_content(body):
    text = "before " + block(body) + " after"
    content, calls = parse(text)
    assert calls == [] and content == text


def test_an_unclosed_block_stays_in_the_content():
    text = "x " + block('{"name": "a"}') + ' y <tool_call>{"name": "b"}'
    assert parse(text) == ('x  y <tool_call>{"name": "b"}', [("call_0", "a", "{}")])


def test_call_ids_and_openai_shape():
    assert re.fullmatch(r"call_[0-9a-f]{24}", make_call_id())
    assert make_call_id() != make_call_id()
    assert make_call_id(random.Random(3)) == make_call_id(random.Random(3))
    assert re.fullmatch(r"call_[0-9a-f]{24}", make_call_id(random.Random(3)))
    call = ToolCall("call_1", "f", '{"x": 1}')
    assert call.as_openai() == {"id": "call_1", "type": "function",
                                "function": {"name": "f", "arguments": '{"x": 1}'}}


def run_stream(pieces):
    stream = ToolCallStream(new_id=counter())
    events = []
    for piece in pieces:
        events += stream.push(piece)
    return events + stream.finish()


def test_stream_holds_back_a_possible_tag_and_open_blocks():
    stream = ToolCallStream(new_id=counter())
    assert stream.push("  Hi <tool") == [("text", "Hi")]
    assert stream.push('_call>{"name": "f", ') == []
    assert stream.push('"arguments": {}}</tool_') == []
    assert stream.push("call> then <tooth") == [
        ("tool_call", ToolCall("call_0", "f", "{}")), ("text", "  then <tooth")]
    assert stream.push(" \n") == []                        # trailing space: held
    assert stream.push("<tool_call>oops") == []
    assert stream.finish() == [("text", " \n<tool_call>oops")]


VALID = ['{"name": "get", "arguments": {"a": {"b": {"c": [1, {"d": 2}]}}}}',
         '{"name": "put", "arguments": {"s": "}{ ]] \\" {{"}}',
         ' {"name": "esc", "arguments": "{\\"k\\": \\"v}\\"}"} ',
         '{"name": "none"}', '\n{"name": "uni", "arguments": {"é": "😀<"}}\n']
MALFORMED = ['{"name": "x", "arguments": ', "plain words", '{"name": 1}', "{}",
             '{"name": "s", "arguments": "{oops"}']
TEXT = ["Hello", " world ", "\n", "{braces}", "a < b", "<tool", "<tool_cal", "x>y", "é😀",
        "  ", "tool_call>", "</tool_call>", "<", "<<tool_call"]


def construct(rng, malformed=True):
    """Text, calls and (optionally) malformed and unclosed blocks in random order."""
    parts = []
    for _ in range(rng.randint(0, 7)):
        kind = rng.random()
        if kind < 0.4:
            parts.append(rng.choice(TEXT))
        elif kind < 0.8 or not malformed:
            parts.append(block(rng.choice(VALID)))
        else:
            parts.append(block(rng.choice(MALFORMED)))
    if malformed and rng.random() < 0.3:
        parts.append("<tool_call>" + rng.choice(VALID + MALFORMED)[: rng.randint(0, 20)])
    return "".join(parts)


def random_split(rng, text):
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12))))
    if rng.random() < 0.2:
        cuts = list(range(1, len(text)))            # one character at a time
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("seed", range(4))
def test_stream_equals_the_whole_parse_on_random_splits(seed):
    rng = random.Random(seed)
    for _ in range(300):
        text = construct(rng)
        pieces = random_split(rng, text) if text else [""]
        events = run_stream(pieces)
        content, calls = parse(text)
        assert "".join(v for k, v in events if k == "text") == content, (pieces, events)
        assert [tuple(v) for k, v in events if k == "tool_call"] == calls, (pieces, events)
        assert all(k in ("text", "tool_call") and v for k, v in events)
        assert all(isinstance(json.loads(arguments), dict) for _, _, arguments in calls)


def test_stream_never_sends_part_of_a_valid_block_as_text():
    rng = random.Random(7)
    plain = [t for t in TEXT if "<" not in t and ">" not in t]
    for _ in range(300):
        text = "".join(rng.choice(plain) if rng.random() < 0.5 else block(rng.choice(VALID))
                       for _ in range(rng.randint(1, 6)))
        events = run_stream(random_split(rng, text))
        assert not any("<" in v or ">" in v for k, v in events if k == "text"), events
        assert len([e for e in events if e[0] == "tool_call"]) == text.count("<tool_call>")
