"""The chat template in the model directory: written by the export (the default, a
built-in by name, a file), listed and checksummed in the manifest, read back exactly;
a bad template is one line naming it, before any work; a damaged one is named when
read; a model directory exported before templates existed loads with the default."""

import json
import os

import pytest

from perspective_jax.cli import export
from perspective_jax.errors import UserError
from perspective_jax.modeldir import format as md
from perspective_jax.modeldir.chat_template import (BUILTIN_TEMPLATES, CHAT_TEMPLATE_FILE,
                                                    DEFAULT_TEMPLATE, NO_TEMPLATE,
                                                    read_chat_template)
from perspective_jax.modeldir.manifest import read_manifest
from perspective_jax.serve.chat import ChatTemplate
from streaming_helpers import export_model, flip_bit

CUSTOM = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}é>"


def _one_line(message: str, *parts):
    assert "\n" not in message and all(p in message for p in parts), message



def test_the_default_template_is_written_listed_and_read_back(exported):
    _, _, path = exported
    manifest = read_manifest(path)
    assert manifest[md.CHAT_TEMPLATE_KEY] == {"file": CHAT_TEMPLATE_FILE,
                                              "source": DEFAULT_TEMPLATE}
    listed = manifest["files"][CHAT_TEMPLATE_FILE]
    assert listed["sha256"] == md.sha256_file(os.path.join(path, CHAT_TEMPLATE_FILE))
    text, source = read_chat_template(path, manifest)
    assert text == BUILTIN_TEMPLATES[DEFAULT_TEMPLATE]
    assert CHAT_TEMPLATE_FILE in source and DEFAULT_TEMPLATE in source


def test_a_named_template_and_a_file_are_exported_exactly(exported, tmp_path):
    cfg, params, _ = exported
    plain = export_model(tmp_path, cfg, params, name="plain", chat_template="plain")
    text, source = read_chat_template(plain, read_manifest(plain))
    assert text == BUILTIN_TEMPLATES["plain"] and "built-in plain" in source
    custom = tmp_path / "custom.jinja"
    custom.write_bytes(CUSTOM.encode("utf-8"))
    out = export_model(tmp_path, cfg, params, name="custom", chat_template=str(custom))
    manifest = read_manifest(out)
    assert manifest[md.CHAT_TEMPLATE_KEY]["source"] == "file"
    text, source = read_chat_template(out, manifest)
    assert text == CUSTOM and "template file" in source
    assert ChatTemplate(text).render([{"role": "user", "content": "hi"}]) == "[user] hi\né>"


@pytest.mark.parametrize("content, parts", [
    (b"{% for m in messages %}\n{{ m.content }\n{% endfor %}", ["line 2", "unexpected '}'"]),
    (b"ok\n{{ x | no_such_filter }}", ["line 2", "no_such_filter"]),
    (b"line one\nbad \xff byte", ["line 2", "not valid UTF-8", "0xff"]),
    (b"  \n", ["empty"]),
])
def test_a_bad_template_file_is_one_line_naming_it_before_any_work(exported, tmp_path,
                                                                   content, parts):
    cfg, params, _ = exported
    bad = tmp_path / "bad.jinja"
    bad.write_bytes(content)
    with pytest.raises(UserError) as err:
        export_model(tmp_path, cfg, params, name="m", chat_template=str(bad))
    _one_line(str(err.value), f"--chat-template {bad}", *parts)
    assert sorted(os.listdir(tmp_path)) == ["bad.jinja", "tok"]      # nothing was written


def test_a_damaged_template_in_the_model_directory_is_named(exported_writable):
    _, _, path = exported_writable
    manifest = read_manifest(path)
    template = os.path.join(path, CHAT_TEMPLATE_FILE)
    flip_bit(template, 10)
    with pytest.raises(md.ModelDirError) as err:
        read_chat_template(path, manifest)
    _one_line(str(err.value), f"{template} fails its sha256 checksum")
    with open(template, "ab") as fh:                    # one byte more: refused on reading
        fh.write(b"x")
    with pytest.raises(md.ModelDirError) as err:
        read_manifest(path)
    _one_line(str(err.value), CHAT_TEMPLATE_FILE, "truncated or corrupt")


def _rewrite(path, edit):
    """manifest.json changed by `edit(manifest)` and sealed again (a consistent manifest
    as another exporter could have written it)."""
    name = os.path.join(path, md.MANIFEST)
    with open(name) as fh:
        manifest = json.load(fh)
    edit(manifest)
    with open(name, "w") as fh:
        json.dump(md.seal_manifest(manifest), fh, indent=1)


def test_a_model_directory_without_a_template_loads_with_the_default(exported_writable):
    from perspective_jax.infer.engine import load_model_tokenizer

    _, _, path = exported_writable

    def older(manifest):                   # as exported before chat templates existed
        del manifest[md.CHAT_TEMPLATE_KEY]
        del manifest["files"][CHAT_TEMPLATE_FILE]
    _rewrite(path, older)
    os.remove(os.path.join(path, CHAT_TEMPLATE_FILE))
    manifest = read_manifest(path)
    load_model_tokenizer(path, manifest)
    assert read_chat_template(path, manifest) == (BUILTIN_TEMPLATES[DEFAULT_TEMPLATE],
                                                  NO_TEMPLATE)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["files"].pop(CHAT_TEMPLATE_FILE), "chat template file"),
    (lambda m: m[md.CHAT_TEMPLATE_KEY].update(file="../x.jinja"), "chat_template entry"),
    (lambda m: m[md.CHAT_TEMPLATE_KEY].pop("source"), "chat_template entry"),
])
def test_a_template_entry_inconsistent_with_the_files_is_refused(exported_writable, edit,
                                                                 message):
    _, _, path = exported_writable
    _rewrite(path, edit)
    with pytest.raises(md.ModelDirError) as err:
        read_manifest(path)
    _one_line(str(err.value), message, "re-run perspective-export")


def test_export_cli_refuses_an_unknown_template_first(tmp_path, capsys):
    out = tmp_path / "m"
    code = export.run(["--run-dir", str(tmp_path / "no-run"), "--out", str(out),
                       "--chat-template", "nope"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "--chat-template nope" in err and "chatml-tools" in err and "plain" in err
    assert not out.exists()
