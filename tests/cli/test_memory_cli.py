"""perspective-memory: fill from JSONL, query exact and reworded keys, list, remove,
stats; damaged files, another model, bad JSONL lines and bad flags are one-line
errors that write nothing."""

import io
import json
import os
import sys

import pytest

from perspective_jax.cli.memory import run
from perspective_jax.memory.memory_file import load
from perspective_jax.modeldir.manifest import model_identity, read_manifest

FACTS = [
    ("the capital of Zorbin is", "Quartzville"),
    ("the inventor of the glass piano was", "Melinda Arkwright"),
    ("the tallest tower in Vesper stands at", "four hundred metres"),
    ("the favourite food of the river otters", "smoked trout"),
    ("the password for the old lighthouse", "seagull-42"),
    ("the colour of the royal banner", "deep emerald"),
    ("the number of moons around Kessel", "seven"),
    ("the name of the captain's parrot", "Admiral Squawk"),
]
REWORDED = [("the capital city of Zorbin is", "Quartzville"),       # one word changed
            ("the colour of the royal flag", "deep emerald"),
            ("the name of the captain's dog", "Admiral Squawk"),
            ("the inventor of the glass harp was", "Melinda Arkwright"),
            ("the number of moons around Tatooine", "seven")]


def _jsonl(path, facts=FACTS, confidence=None):
    with open(path, "w", encoding="utf-8") as fh:
        for i, (k, v) in enumerate(facts):
            obj = {"key": k, "value": v}
            if confidence is not None and i == 0:
                obj["confidence"] = confidence
            fh.write(json.dumps(obj) + "\n")
            if i == 2:
                fh.write("\n")                     # blank lines are skipped
    return str(path)


def _ok(capsys, *argv):
    code = run([str(a) for a in argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def _error(capsys, *argv, code=2):
    got = run([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert got == code and err.startswith("error:") and "\n" not in err, err
    return err


@pytest.fixture
def filled(exported, tmp_path, capsys):
    """(memory file, model dir): the eight facts added from a JSONL file."""
    _, _, model = exported
    mem = str(tmp_path / "facts.hdm")
    out = _ok(capsys, "--memory", mem, "--model-dir", model, "add", "--jsonl",
              _jsonl(tmp_path / "facts.jsonl", confidence=0.5))
    assert out.strip() == f"added 8 entries to {mem}; it holds 8"
    return mem, model


def test_query_finds_exact_and_reworded_keys(filled, capsys):
    mem, model = filled
    for key, value in FACTS + REWORDED:
        hit = json.loads(_ok(capsys, "--memory", mem, "--model-dir", model, "query", key,
                             "--json"))
        assert hit["hit"] and hit["value"] == value, (key, hit)
        exact = (key, value) in FACTS
        assert (hit["key"] == key) == exact and hit["similarity"] > (0.99 if exact else 0.6)
    out = _ok(capsys, "query", "the capital city of Zorbin is", "--memory", mem,
              "--model-dir", model)                    # flags after the command too
    lines = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert lines["value"] == "Quartzville" and lines["key"] == "the capital of Zorbin is"
    assert set(lines) == {"value", "similarity", "key", "bank", "id", "confidence"}
    assert lines["id"] == "0" and lines["confidence"] == "0.5"
    # not found: exit 1, said on stdout
    assert run(["--memory", mem, "--model-dir", model, "query", "the capital city of Zorbin "
                "is", "--min-similarity", "1"]) == 1
    assert capsys.readouterr().out.startswith("no value found (best similarity 0.")
    assert run(["--memory", mem, "--model-dir", model, "query", "xyz", "--json",
                "--min-similarity", "1"]) == 1
    assert json.loads(capsys.readouterr().out)["hit"] is False


def test_add_replace_list_remove_stats(filled, tmp_path, capsys):
    mem, model = filled
    rows = [json.loads(line) for line in _ok(capsys, "--memory", mem, "list",
                                             "--json").splitlines()]
    assert [(r["key"], r["value"]) for r in rows] == FACTS
    assert [r["id"] for r in rows] == list(range(8))
    assert [r["confidence"] for r in rows] == [0.5] + [1.0] * 7
    out = _ok(capsys, "--memory", mem, "list", "--limit", "2").splitlines()
    assert len(out) == 4 and out[-1] == "(2 of 8 entries shown)"
    assert '"the capital of Zorbin is" → "Quartzville"' in out[1]
    # a stored key is replaced; the new pair gets a new id
    out = _ok(capsys, "--memory", mem, "--model-dir", model, "add", FACTS[0][0], "Quartz City",
              "--confidence", "0.9")
    assert out.strip() == f"added 1 entry (1 replaced) to {mem}; it holds 8"
    hit = json.loads(_ok(capsys, "--memory", mem, "--model-dir", model, "query",
                         FACTS[0][0], "--json"))
    assert (hit["value"], hit["id"], hit["confidence"]) == ("Quartz City", 8, 0.9)
    (tmp_path / "k.txt").write_text("the motto of the guild\n", encoding="utf-8")
    (tmp_path / "v.txt").write_text("measure twice\nand cut once\n", encoding="utf-8")
    _ok(capsys, "--memory", mem, "--model-dir", model, "add", "--key-file",
        tmp_path / "k.txt", "--value-file", tmp_path / "v.txt")
    m = load(mem).memory
    assert len(m) == 9 and m.texts[-1] == ("the motto of the guild",
                                           "measure twice\nand cut once")
    out = _ok(capsys, "--memory", mem, "remove", "the motto of the guild")
    assert out.startswith("removed entry 9 (") and out.strip().endswith("it holds 8")
    err = _error(capsys, "--memory", mem, "remove", "the motto of the guild")
    assert "has no entry with key" in err
    _ok(capsys, "--memory", mem, "remove", "--id", "1")
    assert "no entry with id 1" in _error(capsys, "--memory", mem, "remove", "--id", "1")
    assert load(mem).memory.find(FACTS[1][0]) is None
    # what list --json prints is a JSONL another memory can be filled from
    listed = tmp_path / "listed.jsonl"
    listed.write_text(_ok(capsys, "--memory", mem, "list", "--json"), encoding="utf-8")
    copy = str(tmp_path / "copy.hdm")
    _ok(capsys, "--memory", copy, "--model-dir", model, "add", "--jsonl", listed)
    assert load(copy).memory.texts == load(mem).memory.texts
    stats = json.loads(_ok(capsys, "--memory", mem, "stats", "--json"))
    assert stats["entries"] == 7 and stats["dim"] == 10000 and stats["banks"] == 2000
    assert stats["file_bytes"] == os.path.getsize(mem)
    assert stats["bytes_per_entry"] == round(os.path.getsize(mem) / 7, 1)
    assert stats["model"] == model_identity(read_manifest(model))
    text = _ok(capsys, "--memory", mem, "--model-dir", model, "stats")
    assert "entries: 7" in text and f"file_bytes: {os.path.getsize(mem)}" in text
    assert not os.path.exists(mem + ".lock")


def test_jsonl_from_stdin_and_repeated_keys_keep_the_last(exported, tmp_path, capsys,
                                                          monkeypatch):
    _, _, model = exported
    mem = str(tmp_path / "m.hdm")
    lines = [{"key": "alpha key", "value": "one"}, {"key": "beta key", "value": "two"},
             {"key": "alpha key", "value": "three", "confidence": 0.25}]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    out = _ok(capsys, "--memory", mem, "--model-dir", model, "add", "--jsonl", "-",
              "--dim", "2048", "--banks", "64", "--seed", "7")
    assert "added 3 entries (1 replaced)" in out
    m = load(mem).memory
    assert m.texts == [("beta key", "two"), ("alpha key", "three")]
    assert list(m.confidence) == [1.0, 0.25] and (m.params.dim, m.params.n_banks,
                                                  m.params.seed) == (2048, 64, 7)
    # the same options again agree; a different one is refused, nothing written
    _ok(capsys, "--memory", mem, "--model-dir", model, "add", "gamma", "three",
        "--dim", "2048")
    before = open(mem, "rb").read()
    err = _error(capsys, "--memory", mem, "--model-dir", model, "add", "delta", "four",
                 "--banks", "65")
    assert "--banks 65" in err and "--banks 64" in err
    assert "--centre" in _error(capsys, "--memory", mem, "--model-dir", model, "add",
                                "delta", "four", "--centre", "vocabulary")
    assert open(mem, "rb").read() == before


def test_a_bad_jsonl_line_writes_nothing(exported, tmp_path, capsys):
    _, _, model = exported
    mem = str(tmp_path / "m.hdm")
    good = '{"key": "a key", "value": "a value"}\n'
    for line, message in (
            ('{"key": "b", "value": ', "not valid JSON"),
            ('["b", "c"]', "not a JSON object"),
            ('{"key": "b", "value": "c", "confidnce": 1}', "unknown field 'confidnce'"),
            ('{"key": "b", "value": "c", "confidence": 2}', '"confidence" must be a number'),
            ('{"key": "  ", "value": "c"}', '"key" must be a non-empty text'),
            ('{"key": "b"}', '"value" must be a non-empty text')):
        path = tmp_path / "bad.jsonl"
        path.write_text(good + "\n" + line + "\n" + good, encoding="utf-8")
        err = _error(capsys, "--memory", mem, "--model-dir", model, "add", "--jsonl", path)
        assert f"{path}:3: " in err and message in err, err
        assert not os.path.exists(mem)                 # not even created
    _ok(capsys, "--memory", mem, "--model-dir", model, "add", "first", "entry")
    before = open(mem, "rb").read()
    path.write_text(good + '{"key": 1, "value": "x"}\n', encoding="utf-8")
    assert f"{path}:2: " in _error(capsys, "--memory", mem, "--model-dir", model, "add",
                                   "--jsonl", path)
    path.write_text("\n\n", encoding="utf-8")
    assert "no entries" in _error(capsys, "--memory", mem, "--model-dir", model, "add",
                                  "--jsonl", path)
    assert open(mem, "rb").read() == before


def test_damaged_files_are_one_line_errors(filled, tmp_path, capsys):
    mem, model = filled
    data = open(mem, "rb").read()
    short, flipped = str(tmp_path / "short.hdm"), str(tmp_path / "flipped.hdm")
    open(short, "wb").write(data[:len(data) // 2])
    bad = bytearray(data)
    bad[len(data) // 3] ^= 0x40
    open(flipped, "wb").write(bytes(bad))
    for path in (short, flipped):
        for argv in (["list"], ["stats"], ["--model-dir", model, "query", "the capital"],
                     ["remove", FACTS[0][0]],
                     ["--model-dir", model, "add", "new key", "new value"]):
            err = _error(capsys, "--memory", path, *argv)
            assert f"memory file {path}" in err and "damaged" in err, err
    assert "sha256 does not match" in err
    assert open(flipped, "rb").read() == bytes(bad)      # nothing written over it
    assert "no such file" in _error(capsys, "--memory", tmp_path / "none.hdm", "list")
    not_memory = tmp_path / "notes.txt"
    not_memory.write_text("hello\n")
    assert "not a Perspective memory file" in _error(capsys, "--memory", not_memory, "stats")


def test_another_model_and_bad_flags_are_one_line_errors(filled, exported_distinct, tmp_path,
                                                         capsys):
    mem, model = filled
    _, _, other = exported_distinct
    before = open(mem, "rb").read()
    for argv in (["query", "the capital"], ["add", "k", "v"], ["list"], ["stats"],
                 ["remove", FACTS[0][0]]):
        err = _error(capsys, "--memory", mem, "--model-dir", other, *argv)
        assert f"memory {mem} was built with another model" in err
    assert open(mem, "rb").read() == before
    assert "needs --model-dir" in _error(capsys, "--memory", mem, "query", "x")
    assert "needs --model-dir" in _error(capsys, "--memory", mem, "add", "k", "v")
    assert "--memory FILE is required" in _error(capsys, "list")
    assert "one of them" in _error(capsys, "--memory", mem, "--model-dir", model, "add",
                                   "k", "v", "--jsonl", "x.jsonl")
    assert "the value is missing" in _error(capsys, "--memory", mem, "--model-dir", model,
                                            "add", "k")
    assert "go together" in _error(capsys, "--memory", mem, "--model-dir", model, "add",
                                   "--key-file", "k.txt")
    assert "one of them" in _error(capsys, "--memory", mem, "remove")
    assert "--probes" in _error(capsys, "--memory", mem, "query", "x", "--probes", "0")
    assert "--min-similarity" in _error(capsys, "--memory", mem, "query", "x",
                                        "--min-similarity", "0.2")
    assert "--dim" in _error(capsys, "--memory", mem, "add", "k", "v", "--dim", "10")
    assert "unrecognized" in _error(capsys, "--memory", mem, "list", "--colour")
    assert "required" in _error(capsys, "--memory", mem)
    assert "empty" in _error(capsys, "--memory", mem, "--model-dir", model, "query", "  ")
    # a directory that does not exist: refused before anything is written
    err = _error(capsys, "--memory", tmp_path / "no" / "m.hdm", "--model-dir", model, "add",
                 "k", "v")
    assert "does not exist" in err
