"""Find and read a text corpus: files, directories or globs of plain text and
JSON Lines (`text` field); by default the running interpreter's standard
library source. Splits train/validation by document.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from typing import Iterable

from perspective_jax.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".c", ".h", ".js", ".ts", ".java", ".go",
                 ".rs", ".cpp", ".hpp", ".html", ".css", ".tex", ".csv", ".yaml", ".yml",
                 ".toml", ".json", ".sh")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
# Parts of the standard library left out of the default corpus: test suites and
# bundled third-party trees are large and unrepresentative.
_STDLIB_EXCLUDE = ("site-packages", "dist-packages", os.sep + "test", "idlelib", "lib2to3",
                   "__pycache__")


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


def read_documents(files: list[str]) -> list[Document]:
    docs: list[Document] = []
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                if path.endswith(JSONL_SUFFIXES):
                    for n, line in enumerate(fh, 1):
                        if not line.strip():
                            continue
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError as exc:
                            raise UserError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
                        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                            raise UserError(f"{path}:{n}: JSON Lines records need a string "
                                            "'text' field")
                        docs.append(Document(f"{path}:{n}", record["text"]))
                else:
                    docs.append(Document(path, fh.read()))
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror}") from None
    docs = [d for d in docs if d.text]
    if not docs:
        raise UserError(f"the corpus is empty ({len(files)} files, no text)")
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
