"""Find and read a text corpus: files, directories or globs of plain text and
JSON Lines (`text` field); by default the running interpreter's standard
library source. Splits train/validation by document.

Reading is strict about what is text (`decode_text`): a binary file (NUL bytes, or
mostly invalid UTF-8) is skipped with a note, or refused with data.binary_files=
refuse; UTF-16 with a byte-order mark is decoded; other invalid UTF-8 is replaced
by U+FFFD and each such file is named with its count in one note on stderr.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sys
import sysconfig
from typing import Iterable, Optional

from perspective_jax.config.choices import BINARY_FILES
from perspective_jax.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".c", ".h", ".js", ".ts", ".java", ".go",
                 ".rs", ".cpp", ".hpp", ".html", ".css", ".tex", ".csv", ".yaml", ".yml",
                 ".toml", ".json", ".sh")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
# Parts of the standard library left out of the default corpus: test suites and
# bundled third-party trees are large and unrepresentative.
_STDLIB_EXCLUDE = ("site-packages", "dist-packages", os.sep + "test", "idlelib", "lib2to3",
                   "__pycache__")
# A file is binary when it holds a NUL byte (and no UTF-16 byte-order mark) or when
# more than this share of its characters are invalid UTF-8 (text in a legacy 8-bit
# encoding has far fewer: accented letters among ASCII).
BINARY_INVALID_SHARE = 0.5
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_REPLACEMENT = "\ufffd"


@dataclasses.dataclass(frozen=True)
class Document:
    name: str   # file path, or path:line for a JSON Lines record
    text: str


def default_corpus_files() -> list[str]:
    """Python source of the running interpreter's standard library."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                   if not any(part in f[len(root):] for part in _STDLIB_EXCLUDE))
    if not files:
        raise UserError(f"no standard-library sources under {root}; pass --data")
    return files


def expand_paths(specs: Iterable[str], what: str = "--data") -> list[str]:
    """Files, directories (recursively: text and JSONL files) and globs → file list.
    Relative paths are relative to the current directory; `what` names the
    option that gave them in errors (--data, data.path)."""
    specs = list(specs)
    files: list[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            for dirpath, _, names in os.walk(spec):
                files += [os.path.join(dirpath, n) for n in names
                          if n.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)]
        elif os.path.isfile(spec):
            files.append(spec)
        else:
            matched = [f for f in glob.glob(spec, recursive=True) if os.path.isfile(f)]
            if not matched:
                raise UserError(f"{what}: no such file, directory or glob match: {spec}")
            files += matched
    files = sorted(set(files))
    if not files:
        raise UserError(f"{what}: no text or .jsonl files found in {specs}")
    return files


def decode_text(raw: bytes) -> tuple[Optional[str], int]:
    """(text, invalid UTF-8 sequences replaced) of a file's bytes, or (None, 0) when
    they are not text. Newlines are translated as in text mode (CRLF and CR → LF)."""
    if raw.startswith(_UTF16_BOMS):
        text = raw.decode("utf-16", errors="replace")
        replaced = text.count(_REPLACEMENT)
    elif b"\x00" in raw:
        return None, 0
    else:
        text = raw.decode("utf-8", errors="replace")
        replaced = text.count(_REPLACEMENT) - raw.count(_REPLACEMENT.encode())
        if replaced > BINARY_INVALID_SHARE * len(text):
            return None, 0
    return text.replace("\r\n", "\n").replace("\r", "\n"), replaced


def _jsonl_documents(path: str, text: str) -> list[Document]:
    docs = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f"{path}:{n}: JSON Lines records need a string 'text' field")
        docs.append(Document(f"{path}:{n}", record["text"]))
    return docs


def _named(items: list[str], shown: int = 3) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def read_documents(files: list[str], binary_files: str = "skip") -> list[Document]:
    """The documents of `files`; binary ones skipped with a note (or refused:
    `binary_files`="refuse"), invalid UTF-8 replaced and reported in one note."""
    if binary_files not in BINARY_FILES:
        raise UserError(f"data.binary_files={binary_files!r}: use one of {BINARY_FILES}")
    docs: list[Document] = []
    binary, invalid = [], []
    for path in files:
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror}") from None
        text, replaced = decode_text(raw)
        if text is None:
            if binary_files == "refuse":
                raise UserError(f"{path} is not a text file (NUL bytes or mostly invalid "
                                "UTF-8); remove it from the corpus or set "
                                "data.binary_files=skip")
            binary.append(path)
            continue
        if replaced:
            invalid.append(f"{path} ({replaced})")
        if path.endswith(JSONL_SUFFIXES):
            docs += _jsonl_documents(path, text)
        else:
            docs.append(Document(path, text))
    if binary:
        print(f"note: skipped {len(binary)} binary file(s) of the corpus (NUL bytes or "
              f"mostly invalid UTF-8): {_named(binary)}; data.binary_files=refuse stops "
              "instead", file=sys.stderr)
    if invalid:
        print(f"note: {len(invalid)} file(s) of the corpus are not valid UTF-8; invalid "
              f"bytes were replaced by U+FFFD (count): {_named(invalid)}", file=sys.stderr)
    docs = [d for d in docs if d.text]
    if not docs:
        skipped = f", {len(binary)} skipped as binary" if binary else ""
        raise UserError(f"the corpus is empty ({len(files)} files{skipped}, no text)")
    return docs


def content_hash(docs: list[Document], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for d in docs:
        h.update(hashlib.sha256(d.text.encode("utf-8", errors="replace")).digest())
    return h.hexdigest()[:16]


def split_documents(docs: list[Document], val_fraction: float
                    ) -> tuple[list[Document], list[Document]]:
    """Hold out whole documents (chosen by a hash of their name) until the
    validation share reaches `val_fraction` of the characters. A corpus of one
    document holds out its last `val_fraction` of characters instead."""
    if len(docs) == 1:
        text = docs[0].text
        cut = int(len(text) * (1.0 - val_fraction))
        return ([Document(docs[0].name + "[train]", text[:cut])],
                [Document(docs[0].name + "[val]", text[cut:])])
    total = sum(len(d.text) for d in docs)
    order = sorted(docs, key=lambda d: hashlib.sha256(d.name.encode()).hexdigest())
    val, taken = [], 0
    for d in order:
        if taken >= val_fraction * total or len(val) == len(docs) - 1:
            break
        val.append(d)
        taken += len(d.text)
    names = {d.name for d in val}
    return [d for d in docs if d.name not in names], val
