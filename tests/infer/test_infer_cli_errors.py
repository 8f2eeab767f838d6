"""perspective-infer and perspective-export refuse bad input in one line (exit 2)
before doing work whose result would be lost; a failed generation keeps the
conversation when --save-state is given."""

import os

import numpy as np
import pytest

from perspective_jax.cli import infer
from perspective_jax.data.byte_tokenizer import ByteTokenizer
from perspective_jax.errors import UserError
from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.options import EngineOptions
from perspective_jax.infer.session import Conversation

ONE_MB = EngineOptions(host_budget_mb=1)      # host tier of the tests' engines


def _one_line_error(capsys, message, silent=False):
    out, err = capsys.readouterr()
    assert message in err, err
    assert not silent or out == ""                      # nothing generated, nothing lost
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "'nan' is not a finite number"),
    (["--top-p", "inf"], "'inf' is not a finite number"),
    (["--host-budget-mb", "nan"], "'nan' is not a finite number"),
    (["--device-budget-mb", "nan"], "'nan' is not a finite number"),
    (["--seed", "99999999999999999999999"],
     "argument --seed: must lie in [0, 4294967295], got 99999999999999999999999"),
    (["--device-slots", "1"], "argument --device-slots: must lie in [2, "),
    (["--max-tokens", "x"], "'x' is not an integer"),
    (["--save-state", "/no/such/dir/s.state"], "directory /no/such/dir does not exist"),
    (["--stats-json", "."], "--stats-json . is a directory"),
])
def test_bad_infer_flags_fail_before_generating(exported, capsys, flags, message):
    _, _, path = exported
    assert infer.run(["--model-dir", path, "hi"] + flags) == 2
    _one_line_error(capsys, message, silent=True)


def test_bad_infer_flags_are_one_line_errors(exported, capsys):
    _, _, path = exported
    assert infer.run(["--model-dir", path, "hi", "--temperature", "nan"]) == 2
    _one_line_error(capsys, "argument --temperature: 'nan' is not a finite number")
    assert infer.run(["--model-dir", path, "abc\udcff"]) == 2
    _one_line_error(capsys, "the prompt is not valid UTF-8")
    assert infer.run(["--model-dir", os.path.join(path, "manifest.json"), "hi"]) == 2
    _one_line_error(capsys, "is a file, not a directory")


def test_a_state_file_with_damaged_metadata_is_refused(exported, tmp_path):
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open
    _, _, path = exported
    engine = StreamingEngine(path, ONE_MB)
    conv = Conversation(engine, ByteTokenizer(), seed=5)
    conv.generate("hi", 3)
    good = str(tmp_path / "good.state")
    conv.save(good)
    tensors = load_file(good)
    with safe_open(good, "np") as fh:
        meta = fh.metadata()
    cases = {"seed": ({**meta, "seed": "abc"}, tensors),
             "steps": ({**meta, "steps": "-5"}, tensors),
             "pending": (meta, {k: v for k, v in tensors.items() if k != "pending"}),
             "non-finite": (meta, {k: (np.full_like(v, np.nan)
                                       if v.dtype == np.float32 else v)
                                   for k, v in tensors.items()})}
    for name, (m, t) in cases.items():
        bad = str(tmp_path / f"{name}.state")
        save_file(t, bad, metadata=m)
        with pytest.raises(UserError, match="the state file is damaged"):
            Conversation.load(engine, ByteTokenizer(), bad)
    with pytest.raises(UserError, match="is a directory"):
        Conversation.load(engine, ByteTokenizer(), str(tmp_path))
    resumed = Conversation.load(engine, ByteTokenizer(), good, seed=9)
    assert resumed.seed == 9 and Conversation.load(engine, ByteTokenizer(), good).seed == 5
    engine.close()


def test_an_interrupted_generation_saves_the_conversation_so_far(exported, tmp_path,
                                                                 monkeypatch, capsys):
    _, _, path = exported
    state = str(tmp_path / "chat.state")
    calls = []
    forward = StreamingEngine.forward

    def interrupted(self, tokens, st):
        calls.append(len(tokens))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return forward(self, tokens, st)
    monkeypatch.setattr(StreamingEngine, "forward", interrupted)
    assert infer.run(["--model-dir", path, "hello", "--max-tokens", "9", "--temperature", "0",
                      "--save-state", state]) == 130
    assert "conversation so far saved" in capsys.readouterr().err
    monkeypatch.setattr(StreamingEngine, "forward", forward)
    from test_session import IdTokenizer
    from perspective_jax.model.sampling import Sampling
    engine, greedy = StreamingEngine(path, ONE_MB), Sampling(temperature=0.0)
    conv = Conversation.load(engine, IdTokenizer(), state, greedy)
    assert conv.steps == 3 and len(conv.pending) == 1     # 3 sampled, the 3rd not yet fed
    assert conv.state.next_pos == len("hello") + 2
    whole = Conversation(engine, IdTokenizer(), greedy).generate("hello", 9)
    assert whole.endswith(conv.generate("", 6))           # continues as if never stopped
    engine.close()
