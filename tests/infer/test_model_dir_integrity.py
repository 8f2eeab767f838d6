"""Every file of a model directory the engine reads is checked before use: the
tokenizer against its sha256, the manifest (config included) against the sha256 of
its own content; a manifest that is not UTF-8 or of an unverifiable older format is
a one-line error. (Shared weights: test_infer.py::test_infer_cli_errors_are_one_line;
expert regions and deltas: test_infer.py::test_flipped_byte_is_detected_and_named.)"""

import json
import os

import pytest

from streaming_helpers import flip_bit

from perspective_jax.cli import infer
from perspective_jax.data.byte_tokenizer import ByteTokenizer
from perspective_jax.infer.engine import load_model_tokenizer
from perspective_jax.modeldir import format as md
from perspective_jax.modeldir.manifest import read_manifest


def _one_line_error(capsys, *parts):
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert out == "" and all(p in err for p in parts), err



def test_a_flipped_byte_in_the_tokenizer_is_named(exported_writable, capsys):
    _, _, path = exported_writable
    manifest = read_manifest(path)
    assert isinstance(load_model_tokenizer(path, manifest), ByteTokenizer)
    tokenizer = os.path.join(path, "tokenizer.byte")
    flip_bit(tokenizer, 3)
    assert infer.run(["--model-dir", path, "hi", "--max-tokens", "1"]) == 2
    _one_line_error(capsys, f"{tokenizer} fails its sha256 checksum", "re-run perspective-export")


def _edit_text(path, old, new):
    """A hand edit of manifest.json's text (indent=1: '"key": value')."""
    manifest = os.path.join(path, md.MANIFEST)
    with open(manifest) as fh:
        text = fh.read()
    assert text.count(old) == 1, old
    with open(manifest, "w") as fh:
        fh.write(text.replace(old, new))


@pytest.mark.parametrize("key", ["norm_eps", "window", "routing_frequencies"])
def test_one_edited_digit_of_the_manifest_is_refused(exported_writable, capsys, key):
    _, _, path = exported_writable
    manifest = read_manifest(path)
    if key == "routing_frequencies":
        old = f'"{key}": [\n  [\n   {json.dumps(manifest[key][0][0])}'
        _edit_text(path, old, old + "1")                  # first value, one digit more
    else:
        value = manifest["config"]["model"][key]
        edited = value * 2 if isinstance(value, float) else value + 1
        _edit_text(path, f'"{key}": {json.dumps(value)},', f'"{key}": {json.dumps(edited)},')
    manifest_path = os.path.join(path, md.MANIFEST)
    with pytest.raises(md.ModelDirError, match="fails its manifest_sha256 checksum"):
        read_manifest(path)
    assert infer.run(["--model-dir", path, "hi"]) == 2
    _one_line_error(capsys, manifest_path, "re-run perspective-export")


def test_a_manifest_that_is_not_utf8_or_older_is_one_line(exported_writable, capsys):
    _, _, path = exported_writable
    manifest_path = os.path.join(path, md.MANIFEST)
    with open(manifest_path, "rb") as fh:
        raw = fh.read()
    manifest = json.loads(raw)
    with open(manifest_path, "w") as fh:       # the checksum is over the parsed content:
        json.dump(dict(reversed(manifest.items())), fh, indent=4)   # layout is no edit
    assert read_manifest(path) == manifest
    at = raw.index(b'"created"') + 1
    with open(manifest_path, "wb") as fh:
        fh.write(raw[:at] + b"\xff" + raw[at + 1:])
    assert infer.run(["--model-dir", path, "hi"]) == 2
    _one_line_error(capsys, manifest_path, f"not valid UTF-8 (byte 0xff at offset {at})")
    for version in (4, 3):                      # written before the manifest's checksum
        old = {k: v for k, v in manifest.items() if k != md.MANIFEST_CHECKSUM}
        with open(manifest_path, "w") as fh:
            json.dump({**old, "format_version": version}, fh)
        assert infer.run(["--model-dir", path, "hi"]) == 2
        _one_line_error(capsys, manifest_path, f"format version {version} has no checksum",
                        "re-export")
    with open(manifest_path, "w") as fh:       # the current version without its checksum
        json.dump({k: v for k, v in manifest.items() if k != md.MANIFEST_CHECKSUM}, fh)
    with pytest.raises(md.ModelDirError, match="has no manifest_sha256 checksum"):
        read_manifest(path)
