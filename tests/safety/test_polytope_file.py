"""The polytope file (perspective_jax.safety.polytope_file): exact round trip; every
flipped byte, every truncation, a newer version and a missing file are one-line
`PolytopeFileError`s naming the file."""

import hashlib
import json
import struct

import numpy as np
import pytest

from perspective_jax.errors import UserError
from perspective_jax.safety.polytope import FORMAT_VERSION, Polytope
from perspective_jax.safety.polytope_file import (MAGIC, POLYTOPE_FILE, PolytopeFileError,
                                                  decode_polytope, encode_polytope,
                                                  read_polytope, write_polytope)

WHERE = "models/tiny/" + POLYTOPE_FILE


@pytest.fixture(scope="module")
def poly():
    rng = np.random.default_rng(0)
    return Polytope(support_normals=rng.normal(size=(5, 4)),          # float64: stored f4
                    support_bounds=rng.normal(size=5).astype(np.float32),
                    eps=0.1 + 1e-17 + 1 / 3, flagged=("os.system", "é", "日本語", "no 🚫"),
                    flag_tokens=np.array([3, 70000, 9]),              # int64: stored i4
                    flag_caps=np.array([0.5, -1.25, 3e-8], np.float32),
                    interior=rng.normal(size=4).astype(np.float32),
                    meta={"anchors": 1000, "source": "dätä", "nested": {"k": [1, 2.5, None]}})


def errors_naming(fn, where):
    with pytest.raises(PolytopeFileError) as exc:
        fn()
    text = str(exc.value)
    assert isinstance(exc.value, UserError) and where in text and "\n" not in text, text
    return text


def reseal(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def test_round_trip_is_exact(poly, tmp_path):
    path = str(tmp_path / POLYTOPE_FILE)
    digest = write_polytope(path, poly)
    data = open(path, "rb").read()
    assert digest == hashlib.sha256(data).hexdigest()
    assert data[:4] == MAGIC and data == encode_polytope(poly)
    back = read_polytope(path)
    for name, dtype in (("support_normals", np.float32), ("support_bounds", np.float32),
                        ("flag_tokens", np.int32), ("flag_caps", np.float32),
                        ("interior", np.float32)):
        got = getattr(back, name)
        assert got.dtype == dtype and got.dtype.isnative, name
        np.testing.assert_array_equal(got, np.asarray(getattr(poly, name)).astype(dtype))
    assert back.eps == poly.eps and back.flagged == poly.flagged and back.meta == poly.meta
    assert encode_polytope(back) == data                  # and again, byte for byte
    assert list(tmp_path.iterdir()) == [tmp_path / POLYTOPE_FILE]   # no temp file left


def test_a_polytope_without_flagged_tokens_round_trips(poly):
    empty = Polytope(poly.support_normals, poly.support_bounds, 0.0, (),
                     np.zeros(0, np.int32), np.zeros(0, np.float32), poly.interior)
    back = decode_polytope(encode_polytope(empty), WHERE)
    assert back.flag_tokens.shape == (0,) and back.flagged == () and back.meta == {}


def test_every_flipped_byte_is_detected(poly):
    data = encode_polytope(poly)
    hlen = struct.unpack("<II", data[4:12])[1]
    classes = {"magic": range(0, 4), "version": range(4, 8), "header length": range(8, 12),
               "header": range(12, 12 + hlen), "arrays": range(12 + hlen, len(data) - 32),
               "digest": range(len(data) - 32, len(data))}
    assert all(len(r) for r in classes.values())
    for kind, positions in classes.items():
        for pos in positions:
            for flip in (0x01, 0x80, 0xFF):
                bad = bytearray(data)
                bad[pos] ^= flip
                text = errors_naming(lambda: decode_polytope(bytes(bad), WHERE), WHERE)
                if kind == "magic":
                    assert "no polytope header" in text
                elif kind == "version":          # a larger number reads as a newer format
                    assert "checksum" in text or "newer" in text
                else:
                    assert "checksum" in text, (kind, pos, text)


def test_every_truncation_and_an_extension_are_detected(poly):
    data = encode_polytope(poly)
    for n in range(len(data)):
        errors_naming(lambda: decode_polytope(data[:n], WHERE), WHERE)
    errors_naming(lambda: decode_polytope(data + b"\0", WHERE), WHERE)


def test_a_damaged_file_on_disk_names_its_path(poly, tmp_path):
    path = str(tmp_path / POLYTOPE_FILE)
    write_polytope(path, poly)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))
    assert "checksum" in errors_naming(lambda: read_polytope(path), path)


def test_a_newer_version_is_refused(poly):
    data = encode_polytope(poly)
    newer = reseal(data[:4] + struct.pack("<I", FORMAT_VERSION + 1) + data[8:-32])
    text = errors_naming(lambda: decode_polytope(newer, WHERE), WHERE)
    assert f"version {FORMAT_VERSION + 1}" in text and "newer" in text


def test_consistent_but_malformed_contents_are_refused(poly):
    """Sealed with a valid digest but wrong inside: shapes that do not match the
    bytes, a polytope that does not hold together, a header that is not JSON."""
    data = encode_polytope(poly)
    hlen = struct.unpack("<II", data[4:12])[1]
    header = json.loads(data[12:12 + hlen])
    arrays = data[12 + hlen:-32]

    def with_header(h: dict, tail: bytes = arrays) -> bytes:
        raw = json.dumps(h).encode("utf-8")
        return reseal(MAGIC + struct.pack("<II", FORMAT_VERSION, len(raw)) + raw + tail)

    fewer = json.loads(json.dumps(header))
    fewer["shapes"]["interior"] = [3]                     # 4 bytes left over
    assert "left over" in errors_naming(lambda: decode_polytope(with_header(fewer), WHERE), WHERE)
    more = json.loads(json.dumps(header))
    more["shapes"]["interior"] = [9]                      # runs past the end
    errors_naming(lambda: decode_polytope(with_header(more), WHERE), WHERE)
    bounds = json.loads(json.dumps(header))               # 5 normals, 4 bounds, 1 more cap
    bounds["shapes"]["support_bounds"] = [4]
    bounds["shapes"]["flag_tokens"] = [4]
    text = errors_naming(lambda: decode_polytope(with_header(bounds), WHERE), WHERE)
    assert "polytope" in text
    missing = {k: v for k, v in header.items() if k != "eps"}
    errors_naming(lambda: decode_polytope(with_header(missing), WHERE), WHERE)
    raw = b"{not json"
    garbled = reseal(MAGIC + struct.pack("<II", FORMAT_VERSION, len(raw)) + raw + arrays)
    assert "malformed" in errors_naming(lambda: decode_polytope(garbled, WHERE), WHERE)


def test_a_missing_or_unreadable_file_is_a_one_line_error(tmp_path):
    path = str(tmp_path / "none" / POLYTOPE_FILE)
    assert "cannot read" in errors_naming(lambda: read_polytope(path), path)
    errors_naming(lambda: read_polytope(str(tmp_path)), str(tmp_path))   # a directory
