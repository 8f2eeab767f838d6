"""Conversations on the streaming engine: exact resume, stop strings while
streaming, and a feed that fails part-way leaving the state as it was."""

import re

import jax
import numpy as np
import pytest

from perspective_jax.data.byte_tokenizer import ByteTokenizer
from perspective_jax.errors import UserError
from perspective_jax.model.sampling import Sampling
from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.options import EngineOptions
from perspective_jax.infer.session import Conversation
from perspective_jax.infer.text_stream import streamable as _streamable
from streaming_helpers import reference_logits

ONE_MB = EngineOptions(host_budget_mb=1)      # host tier of the tests' engines


class IdTokenizer(ByteTokenizer):
    """Byte ids in, '<id>' per token out: equal text means equal token ids (a byte
    tokenizer decodes every invalid byte to the same U+FFFD)."""

    def decode(self, ids) -> str:
        return "".join(f"<{int(i)}>" for i in ids)


def test_saved_conversation_resumes_identically(exported, tmp_path):
    _, _, path = exported
    tok, sampling = IdTokenizer(), Sampling(temperature=1.0, top_k=50)
    one = Conversation(StreamingEngine(path, ONE_MB), tok, sampling, seed=3)
    first = one.generate("hello", 12)
    whole = first + one.generate("", 12)
    assert len(set(whole.split(">"))) > 6               # sampled, not one repeated token
    two = Conversation(StreamingEngine(path, ONE_MB), tok, sampling, seed=3)
    assert two.generate("hello", 12) == first
    two.save(str(tmp_path / "chat.state"))
    three = Conversation.load(StreamingEngine(path, ONE_MB), tok,
                              str(tmp_path / "chat.state"), sampling)
    assert first + three.generate("", 12) == whole
    four = Conversation(StreamingEngine(path, ONE_MB), tok, sampling, seed=4)
    assert four.generate("hello", 12) != first          # the seed is used
    with pytest.raises(UserError, match="prompt is empty"):
        Conversation(three.engine, tok).generate("", 4)


class ScriptedEngine:
    """Greedy logits that spell `script`, one character per step."""

    def __init__(self, script: str):
        self.script, self.fed = script, 0

    def new_state(self):
        return {}

    def forward(self, tokens, state):
        self.fed += len(tokens)
        logits = np.zeros(256, np.float32)
        logits[ord(self.script[min(self.fed - 1, len(self.script) - 1)])] = 1.0
        return logits, state


def test_streamed_text_never_shows_the_start_of_a_stop_string():
    shown = []
    conv = Conversation(ScriptedEngine("xyab-cd"), ByteTokenizer(), Sampling(temperature=0.0))
    assert conv.generate("p", 10, stop=["ab"], on_text=shown.append) == "xy"
    assert "".join(shown) == "xy"
    shown.clear()
    conv = Conversation(ScriptedEngine("xyac-ab"), ByteTokenizer(), Sampling(temperature=0.0))
    assert conv.generate("p", 10, stop=["ab"], on_text=shown.append) == "xyac-"
    assert "".join(shown) == "xyac-" and shown[2:] == ["ac", "-"]   # 'a' held, then let go
    assert _streamable("tail\ufffd", ["zz"]) == "tail"
    assert _streamable("to be or", ["or not", "b"]) == "to be "
    assert _streamable("abc", []) == "abc"


def test_a_feed_that_fails_part_way_leaves_the_state_as_it_was(exported):
    cfg, params, path = exported
    prompt, steps = np.arange(5, 17), np.arange(30, 33)
    ref = reference_logits(cfg, params, prompt, steps)
    engine = StreamingEngine(path, ONE_MB)
    _, state = engine.forward(prompt, engine.new_state())
    before = jax.tree.map(np.asarray, state)
    ensure, calls = engine.tiers.ensure, []

    def failing(key, then=None):
        calls.append(key)
        if len(calls) == 2:                              # the second expert layer
            raise OSError("EIO")
        return ensure(key, then)
    engine.tiers.ensure = failing
    with pytest.raises(OSError, match="EIO"):
        engine.forward(np.array([steps[0]]), state)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state), before)
    engine.tiers.ensure = ensure
    for k, tok in enumerate(steps):                      # the retry continues exactly
        got, state = engine.forward(np.array([tok]), state)
        np.testing.assert_allclose(got, ref[k + 1], rtol=1e-4, atol=1e-4)
    engine.close()


def test_prefill_and_decode_timings_leave_compilation_out(exported):
    """The first feed of each shape compiles; that time is `compile_s`, not prefill or
    decode time, and a second feed of the same shapes compiles nothing."""
    import time
    from perspective_jax.infer import compile_clock
    _, _, path = exported
    engine = StreamingEngine(path, ONE_MB)
    prompt = np.arange(40, 57)

    def feed(state):
        t0 = time.perf_counter()
        _, state = engine.forward(prompt, state)
        _, state = engine.forward(np.array([7]), state)
        return time.perf_counter() - t0
    state = engine.new_state()
    clock0 = compile_clock.seconds()
    first = feed(state)
    s = engine.stats
    compiled = s.compile_s
    assert compiled > 0 and compiled == pytest.approx(compile_clock.seconds() - clock0)
    assert s.prefill_s > 0 and s.decode_s > 0
    assert s.prefill_s + s.decode_s + compiled == pytest.approx(first, rel=0.05, abs=0.05)
    feed(engine.new_state())                      # same shapes, same experts: all cached
    assert engine.stats.compile_s == compiled
    assert engine.report()["compile_s"] == compiled
    engine.close()


def _flip_in_tensor(path, name):
    """Flip the lowest bit of the first byte of tensor `name` in a safetensors file (for
    a float: a change in the last place, still finite)."""
    import json
    with open(path, "rb") as fh:
        raw = bytearray(fh.read())
    n = int.from_bytes(raw[:8], "little")
    start = json.loads(raw[8: 8 + n])[name]["data_offsets"][0]
    raw[8 + n + start] ^= 0x01
    with open(path, "wb") as fh:
        fh.write(raw)


def test_an_edited_or_damaged_conversation_state_is_refused(exported, tmp_path):
    """The position, the step count and every tensor byte are under the file's sha256;
    a state of the older format (no checksum) is refused, not read unverified."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file
    _, _, path = exported
    engine = StreamingEngine(path, ONE_MB)
    conv = Conversation(engine, IdTokenizer(), seed=5)     # a fresh one: nothing compiled
    conv.steps = 4
    good = str(tmp_path / "good.state")
    conv.save(good)
    tensors = load_file(good)
    with safe_open(good, "np") as fh:
        meta = fh.metadata()
    float_key = next(k for k, v in tensors.items() if v.dtype == np.float32 and v.size)
    edits = {"position": (meta, {**tensors, "next_pos": tensors["next_pos"] + 1}),
             "steps": ({**meta, "steps": str(int(meta["steps"]) + 1)}, tensors),
             "older": ({k: v for k, v in meta.items() if k != "sha256"}
                       | {"format": "perspective-conversation/1"}, tensors)}
    for name, (m, t) in edits.items():
        bad = str(tmp_path / f"{name}.state")
        save_file(t, bad, metadata=m)
        message = ("older format 'perspective-conversation/1', which has no checksum"
                   if name == "older" else "fails its sha256 checksum")
        with pytest.raises(UserError, match=f"^{re.escape(bad)}: .*{message}"):
            Conversation.load(engine, IdTokenizer(), bad)
    flipped = str(tmp_path / "flipped.state")
    conv.save(flipped)
    _flip_in_tensor(flipped, float_key)
    with pytest.raises(UserError, match=f"^{re.escape(flipped)}: .*fails its sha256 checksum"):
        Conversation.load(engine, IdTokenizer(), flipped)
    assert Conversation.load(engine, IdTokenizer(), good).state.next_pos == conv.state.next_pos
    engine.close()


def test_a_saved_decode_cache_with_an_edited_position_is_refused(small_cfg, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file
    from perspective_jax.model.cache_io import load_cache, save_cache
    from perspective_jax.model.transformer import init_cache
    path = str(tmp_path / "c.safetensors")
    save_cache(init_cache(small_cfg, 1), path)
    tensors = load_file(path)
    with safe_open(path, "np") as fh:
        meta = fh.metadata()
    save_file({**tensors, "next_pos": tensors["next_pos"] + 3}, path, metadata=meta)
    with pytest.raises(UserError, match=f"^{re.escape(path)}: .*fails its sha256 checksum"):
        load_cache(path, small_cfg)
