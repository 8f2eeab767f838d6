"""The memory file: a round trip keeps every column, text, bank and next_id (and the
queries); damage anywhere, truncation, a foreign file and a newer version are each one
line of UserError naming the file."""

import hashlib
import json
import struct

import numpy as np
import pytest

from perspective_jax.errors import UserError
from perspective_jax.memory import hypervector as hv
from perspective_jax.memory import memory_file as mfile
from perspective_jax.memory.store import HDMemory, MemoryParams

TEXTS = [("the capital of Zorbin", "Quartzville"), ("ключ", "значение ✓"),
         (None, "a value without a key text"), ("a key without a value", None),
         (None, None), ("emoji 🧠 and\nnewline", "tab\tand \"quotes\""),
         ("line\u2028separator", "next\x85line and \x1c"), ("", "")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    rng = np.random.default_rng(0)
    params = MemoryParams(dim=1000, n_banks=12, seed=5)
    mem = HDMemory.new(params)
    keys, vals = hv.random(rng, 60, 1000), hv.random(rng, 60, 1000)
    for i in range(50):
        k, v = TEXTS[i % len(TEXTS)] if i < len(TEXTS) else (f"k{i}", f"v{i}")
        mem.add(keys[i], vals[i], key=k, value=v, confidence=i / 50, timestamp=1e9 + i * 0.25)
    mem.remove_rows([3, 17, 40])                          # next_id > entries
    mem.add_many(keys[50:], vals[50:], keys=[f"bulk{i}" for i in range(10)])
    mf = mfile.MemoryFile(mem, rng.standard_normal(24).astype(np.float32), "models/tiny")
    path = tmp_path_factory.mktemp("mem") / "facts.hdm"
    mfile.save(str(path), mf)
    return mf, path, keys


def test_round_trip_keeps_everything(saved):
    mf, path, keys = saved
    got = mfile.load(str(path))
    a, b = mf.memory, got.memory
    assert b.params == a.params and b.next_id == a.next_id == 60 and len(b) == len(a) == 57
    for name in ("key_hv", "value_hv", "bank", "time", "confidence", "ids"):
        x, y = getattr(a, name), getattr(b, name)
        assert y.dtype == x.dtype, name
        np.testing.assert_array_equal(y, x, err_msg=name)
    assert b.texts == a.texts
    assert (None, None) in b.texts and ("ключ", "значение ✓") in b.texts
    for name in ("banks", "key_banks"):
        np.testing.assert_array_equal(getattr(b, name).packed, getattr(a, name).packed)
        np.testing.assert_array_equal(getattr(b, name).sizes, getattr(a, name).sizes)
    np.testing.assert_array_equal(got.centre, mf.centre)
    assert got.model == "models/tiny"
    assert b.query_many(keys) == a.query_many(keys)
    assert b.find("ключ") == a.find("ключ") is not None
    assert mfile.to_bytes(got) == path.read_bytes()       # byte for byte stable


def test_a_loaded_memory_keeps_changing_like_the_original(saved):
    mf, path, keys = saved
    got = mfile.load(str(path)).memory
    rng = np.random.default_rng(1)
    k, v = hv.random(rng, 1, 1000)[0], hv.random(rng, 1, 1000)[0]
    got.add(k, v, key="ключ", value="replaced")
    got.remove_rows([0])
    packed, key_packed = got.banks.packed.copy(), got.key_banks.packed.copy()
    got.rebuild_banks()
    np.testing.assert_array_equal(packed, got.banks.packed)
    np.testing.assert_array_equal(key_packed, got.key_banks.packed)


def test_empty_memory_round_trips(tmp_path):
    mem = HDMemory.new(MemoryParams(dim=256, n_banks=3))
    path = tmp_path / "empty.hdm"
    mfile.save(str(path), mfile.MemoryFile(mem, np.zeros(4, np.float32), None))
    got = mfile.load(str(path))
    assert len(got.memory) == 0 and got.model is None and got.memory.next_id == 0
    np.testing.assert_array_equal(got.memory.banks.packed, mem.banks.packed)


def one_line_error(path, match=None) -> str:
    with pytest.raises(UserError) as err:
        mfile.load(str(path))
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg, msg
    if match:
        assert match in msg, msg
    return msg


def layout(data: bytes):
    """(header end, header dict) of a memory file's bytes."""
    head = len(mfile.MAGIC) + 12
    hlen = struct.unpack("<Q", data[len(mfile.MAGIC) + 4:head])[0]
    return head + hlen, json.loads(data[head:head + hlen])


def test_a_changed_byte_anywhere_is_damage(saved, tmp_path):
    _, path, _ = saved
    data = path.read_bytes()
    end, header = layout(data)
    secs = header["sections"]
    places = {"header length": len(mfile.MAGIC) + 6, "header": len(mfile.MAGIC) + 20,
              "banks": end + secs["banks"]["offset"] + 5,
              "key_hv": end + secs["key_hv"]["offset"] + 123,
              "texts": end + secs["texts"]["offset"] + 3,
              "padding": end + secs["banks"]["offset"] + secs["banks"]["nbytes"] + 1,
              "trailer": len(data) - 1}
    for where, at in places.items():
        bad = bytearray(data)
        bad[at] ^= 0x5A
        p = tmp_path / f"flip-{where.replace(' ', '-')}.hdm"
        p.write_bytes(bytes(bad))
        assert "damaged" in one_line_error(p), where


@pytest.mark.parametrize("keep", [0.999, 0.5, 40, 21])
def test_truncation_is_damage(saved, tmp_path, keep):
    _, path, _ = saved
    data = path.read_bytes()
    n = int(len(data) * keep) if keep < 1 else keep
    p = tmp_path / "cut.hdm"
    p.write_bytes(data[:n])
    one_line_error(p, "damaged")


def test_not_a_memory_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_bytes(b"hello, this is a text file and not a memory" * 10)
    one_line_error(p, "not a Perspective memory file")
    p.write_bytes(b"")
    one_line_error(p, "not a Perspective memory file")


def resealed(data: bytes, at: int, new: bytes) -> bytes:
    body = bytearray(data[:-32])
    body[at:at + len(new)] = new
    return bytes(body) + hashlib.sha256(body).digest()


def test_newer_version_asks_for_an_upgrade(saved, tmp_path):
    _, path, _ = saved
    p = tmp_path / "future.hdm"
    p.write_bytes(resealed(path.read_bytes(), len(mfile.MAGIC),
                           struct.pack("<I", mfile.VERSION + 1)))
    msg = one_line_error(p, "upgrade")
    assert f"version {mfile.VERSION + 1}" in msg


def test_sealed_but_inconsistent_header_is_damage(saved, tmp_path):
    """A checksum that matches a header that does not (entries changed, resealed)."""
    _, path, _ = saved
    data = path.read_bytes()
    at = data.index(b'"entries": 57')
    p = tmp_path / "liar.hdm"
    p.write_bytes(resealed(data, at, b'"entries": 58'))
    one_line_error(p, "inconsistent")


def test_missing_file_and_directory(tmp_path):
    one_line_error(tmp_path / "nope.hdm", "no such file")
    with pytest.raises(UserError, match="is a directory"):
        mfile.load(str(tmp_path))
