"""perspective-memory: build, query and inspect a Holographic Distributed Memory file.

    perspective-memory --memory facts.hdm --model-dir models/tiny add "the capital of Zorbin" Quartzville
    perspective-memory --memory facts.hdm --model-dir models/tiny add --jsonl facts.jsonl
    perspective-memory --memory facts.hdm --model-dir models/tiny query "Zorbin's capital"
    perspective-memory --memory facts.hdm list --limit 20
    perspective-memory --memory facts.hdm remove "the capital of Zorbin"
    perspective-memory --memory facts.hdm stats --json

`add` and `query` encode texts with the model's own embedding (--model-dir); a
memory is bound to the model it was built with. `add` creates the file on first
use (--dim, --banks, --seed; its codebook centre is the mean representation of
the texts of that first add, --centre) and replaces an entry whose key text is
already stored. `query` exits 0 when it finds a value, 1 when none reaches
--min-similarity. Every error (missing or damaged file, another model, a bad
flag or JSONL line) is one line, exit 2. Writers (`add`, `remove`) take the
file's lock (`memory.writer`); readers need none. Guide: docs/memory.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional

import numpy as np

from perspective_jax.cli.common import OneLineParser, cli_entry, exit_with, float_in, int_in
from perspective_jax.errors import UserError

DEFAULT_DIM, DEFAULT_BANKS, DEFAULT_SEED = 10_000, 2000, 0
ENCODE_BLOCK = 1024          # texts projected by the codebook at a time
JSONL_FIELDS = ("key", "value", "confidence")
LISTED_FIELDS = ("id", "time")   # what `list --json` adds: accepted, ignored
CENTRES = ("texts", "vocabulary")


def _where(p: argparse.ArgumentParser, top: bool) -> None:
    """--memory and --model-dir, before the command or after it."""
    default = None if top else argparse.SUPPRESS
    p.add_argument("--memory", metavar="FILE", default=default,
                   help="the memory file (created by the first add)")
    p.add_argument("--model-dir", metavar="M", default=default,
                   help="the model whose embedding encodes the texts (add, query)")


def _parser() -> argparse.ArgumentParser:
    from perspective_jax.memory.recall import RecallConfig
    p = OneLineParser(prog="perspective-memory", description=__doc__.splitlines()[0])
    _where(p, top=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wait = dict(type=float_in(0.0, 3600.0), default=10.0, metavar="S",
                help="seconds to wait for another writer of the file (default 10)")

    a = sub.add_parser("add", help="store key → value pairs (replacing a stored key)")
    _where(a, top=False)
    a.add_argument("key", nargs="?", help="the key text")
    a.add_argument("value", nargs="?", help="the value text")
    a.add_argument("--confidence", type=float_in(0.0, 1.0), default=None,
                   help="the pair's confidence in [0, 1] (default 1; the default for JSONL "
                        "lines without one)")
    a.add_argument("--jsonl", metavar="FILE",
                   help="one JSON object a line: {\"key\", \"value\", \"confidence\"?}; "
                        "'-' reads standard input")
    a.add_argument("--key-file", metavar="F", help="the key text from a file")
    a.add_argument("--value-file", metavar="G", help="the value text from a file")
    a.add_argument("--dim", type=int_in(64, 1 << 20), default=None,
                   help=f"bits per hypervector of a new memory (default {DEFAULT_DIM})")
    a.add_argument("--banks", type=int_in(1, 1_000_000), default=None,
                   help=f"banks of a new memory (default {DEFAULT_BANKS})")
    a.add_argument("--seed", type=int_in(0, 2**63 - 1), default=None,
                   help=f"seed of a new memory (default {DEFAULT_SEED})")
    a.add_argument("--centre", choices=CENTRES, default=None,
                   help="codebook centre of a new memory: the mean representation of the "
                        "texts added (default), or the mean embedding row of the vocabulary")
    a.add_argument("--lock-timeout", **wait)

    q = sub.add_parser("query", help="the value stored for a key (exit 1: none found)")
    _where(q, top=False)
    q.add_argument("text", help="the key text to look up (need not match exactly)")
    q.add_argument("--probes", type=int_in(1, 4096), default=RecallConfig.probes,
                   help=f"candidate banks (default {RecallConfig.probes})")
    q.add_argument("--min-similarity", type=float_in(0.5, 1.0),
                   default=RecallConfig.min_similarity,
                   help="the least similarity that counts as found (unrelated ≈ 0.5; "
                        f"default {RecallConfig.min_similarity})")
    q.add_argument("--json", action="store_true", help="print the answer as JSON")

    ls = sub.add_parser("list", help="the stored entries, oldest first")
    _where(ls, top=False)
    ls.add_argument("--limit", type=int_in(0), default=None, help="show at most N entries")
    ls.add_argument("--json", action="store_true", help="one JSON object a line")

    r = sub.add_parser("remove", help="take an entry out (by key text or --id)")
    _where(r, top=False)
    r.add_argument("key", nargs="?", help="the key text of the entry")
    r.add_argument("--id", type=int_in(0, 2**63 - 1), default=None, help="the entry's id")
    r.add_argument("--lock-timeout", **wait)

    s = sub.add_parser("stats", help="entries, banks, sizes and the model")
    _where(s, top=False)
    s.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p


# ---------------------------------------------------------------------------- input
def _text_file(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().rstrip("\r\n")
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{flag} {path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None


def _text(value, what: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: {what} must be a non-empty text")
    return value


def read_jsonl(path: str, confidence: float) -> list[tuple[str, str, float]]:
    """(key, value, confidence) of every non-blank line of a JSONL file ('-': stdin);
    a bad line is a one-line error naming FILE:LINE. Lines of `list --json` are
    accepted as they are (their id and time are not kept)."""
    name = "<stdin>" if path == "-" else path
    try:
        raw = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
    except FileNotFoundError:
        raise UserError(f"--jsonl {path}: no such file") from None
    except OSError as e:
        raise UserError(f"--jsonl {path}: cannot read it ({e.strerror or e})") from None
    out = []
    for n, line in enumerate(raw.split(b"\n"), 1):
        where = f"{name}:{n}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: not UTF-8 (byte {e.start} of the line)") from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{where}: not a JSON object with \"key\" and \"value\"")
        extra = sorted(set(obj) - set(JSONL_FIELDS) - set(LISTED_FIELDS))
        if extra:
            raise UserError(f"{where}: unknown field {extra[0]!r} (the fields are "
                            f"{', '.join(JSONL_FIELDS)})")
        key = _text(obj.get("key"), '"key"', where)
        value = _text(obj.get("value"), '"value"', where)
        conf = obj.get("confidence", confidence)
        if (isinstance(conf, bool) or not isinstance(conf, (int, float))
                or not math.isfinite(conf) or not 0.0 <= conf <= 1.0):
            raise UserError(f"{where}: \"confidence\" must be a number in [0, 1], got "
                            f"{json.dumps(conf)}")
        out.append((key, value, float(conf)))
    if not out:
        raise UserError(f"--jsonl {name}: no entries (one JSON object a line)")
    return out


def _entries(a: argparse.Namespace) -> list[tuple[str, str, float]]:
    """What `add` stores, read and checked before anything else is done."""
    conf = 1.0 if a.confidence is None else a.confidence
    positional = a.key is not None or a.value is not None
    files = a.key_file is not None or a.value_file is not None
    if sum((positional, a.jsonl is not None, files)) != 1:
        raise UserError("add takes KEY VALUE, or --jsonl FILE, or --key-file F "
                        "--value-file G (one of them)")
    if a.jsonl is not None:
        return read_jsonl(a.jsonl, conf)
    if files:
        if a.key_file is None or a.value_file is None:
            raise UserError("--key-file and --value-file go together")
        key, value = _text_file(a.key_file, "--key-file"), _text_file(a.value_file,
                                                                      "--value-file")
        return [(_text(key, "the key", a.key_file), _text(value, "the value", a.value_file),
                 conf)]
    if a.value is None:
        raise UserError("add KEY VALUE: the value is missing")
    return [(_text(a.key, "the key", "add"), _text(a.value, "the value", "add"), conf)]


# ---------------------------------------------------------------------------- model
def _model_dir(a: argparse.Namespace) -> str:
    if a.model_dir is None:
        raise UserError(f"{a.command} needs --model-dir M: the model whose embedding "
                        "encodes the texts (the one the memory was built with)")
    return a.model_dir


def _check_model_dir(a: argparse.Namespace, mf) -> None:
    """With --model-dir on a command that needs no model: the memory must be its."""
    if a.model_dir is not None:
        from perspective_jax.infer.memory_codec import check_model
        from perspective_jax.modeldir.manifest import model_identity, read_manifest
        check_model(mf, model_identity(read_manifest(a.model_dir)), a.memory)


def _encode(codebook, reps: np.ndarray) -> np.ndarray:
    """Packed hypervectors [N, W] of representations [N, d] (in blocks)."""
    return np.concatenate([codebook.encode(reps[i:i + ENCODE_BLOCK])
                           for i in range(0, len(reps), ENCODE_BLOCK)])


# ---------------------------------------------------------------------------- commands
def _add(a: argparse.Namespace) -> int:
    entries = _entries(a)
    from perspective_jax.infer.memory_codec import (centre_of, check_model, codebook_for,
                                                    model_codec, new_centre)
    from perspective_jax.memory.store import MemoryParams
    from perspective_jax.memory.writer import memory_writer

    mc = model_codec(_model_dir(a))
    keys, values, confs = map(list, zip(*entries))
    rep = {t: mc.codec.represent(t) for t in dict.fromkeys(keys + values)}   # once a text
    params = centre = None
    if not os.path.exists(a.memory):
        params = MemoryParams(dim=DEFAULT_DIM if a.dim is None else a.dim,
                              n_banks=DEFAULT_BANKS if a.banks is None else a.banks,
                              seed=DEFAULT_SEED if a.seed is None else a.seed)
        centre = (new_centre(mc.codec, mc.vocab_size) if a.centre == "vocabulary" else
                  centre_of([rep[t] for t in keys + values]))    # = text_centre(texts)
    elif a.centre is not None:
        raise UserError(f"--centre {a.centre}: memory {a.memory} exists and keeps the centre "
                        "it was built with; leave the option out or start a new file")
    with memory_writer(a.memory, params, mc.identity, centre, a.lock_timeout) as mf:
        check_model(mf, mc.identity, a.memory)
        mem = mf.memory
        for flag, given, have in (("--dim", a.dim, mem.params.dim),
                                  ("--banks", a.banks, mem.params.n_banks),
                                  ("--seed", a.seed, mem.params.seed)):
            if given is not None and given != have:
                raise UserError(f"{flag} {given}: memory {a.memory} was built with "
                                f"{flag} {have}; leave the option out or start a new file")
        book = codebook_for(mf)
        key_hvs = _encode(book, np.stack([rep[k] for k in keys]))
        value_hvs = _encode(book, np.stack([rep[v] for v in values]))
        replaced = sum(mem.find(k) is not None for k in set(keys))
        replaced += len(keys) - len(set(keys))
        if not replaced and len(keys) > 1:        # a bulk load: the banks built once
            mem.add_many(key_hvs, value_hvs, keys, values)
            mem.confidence[-len(keys):] = np.asarray(confs, np.float32)
        else:                                     # replacements in order, as store.add
            for i, (k, v, c) in enumerate(entries):
                mem.add(key_hvs[i], value_hvs[i], key=k, value=v, confidence=c)
        total = len(mem)
    print(f"added {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
          + (f" ({replaced} replaced)" if replaced else "")
          + f" to {a.memory}; it holds {total}")
    return 0


def _query(a: argparse.Namespace) -> int:
    from perspective_jax.infer.memory_codec import check_model, codec_for, model_codec
    from perspective_jax.memory.memory_file import load

    mf = load(a.memory)                   # a missing or damaged file before the model
    mc = model_codec(_model_dir(a))
    check_model(mf, mc.identity, a.memory)
    codec = codec_for(mf, mc.codec.tokenize, mc.codec.embed_rows)
    if not a.text.strip():
        raise UserError("query: the text is empty; give the key to look up")
    mem = mf.memory
    hit = mem.query(codec.encode(a.text), a.probes)
    if hit is None or hit.similarity < a.min_similarity:
        best = None if hit is None else round(hit.similarity, 4)
        if a.json:
            print(json.dumps({"hit": False, "similarity": best}))
        else:
            why = ("the memory is empty" if hit is None else
                   f"best similarity {best:.4f} < --min-similarity {a.min_similarity:g}")
            print(f"no value found ({why})")
        return 1
    key, value = mem.texts[hit.row]
    out = {"hit": True, "value": value, "similarity": round(hit.similarity, 4), "key": key,
           "bank": hit.bank, "id": int(mem.ids[hit.row]),
           "confidence": round(float(mem.confidence[hit.row]), 4)}
    if a.json:
        print(json.dumps(out, ensure_ascii=False))
    else:
        for name in ("value", "similarity", "key", "bank", "id", "confidence"):
            print(f"{name}: {out[name]}")
    return 0


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _list(a: argparse.Namespace) -> int:
    from perspective_jax.memory.memory_file import load

    mf = load(a.memory)
    _check_model_dir(a, mf)
    mem = mf.memory
    n = len(mem) if a.limit is None else min(a.limit, len(mem))
    rows = [{"id": int(mem.ids[i]), "key": mem.texts[i][0], "value": mem.texts[i][1],
             "confidence": round(float(mem.confidence[i]), 4), "time": float(mem.time[i])}
            for i in range(n)]
    if a.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return 0
    print(f"{'id':>6}  {'conf':>5}  {'time':19}  key → value")
    for r in rows:
        print(f"{r['id']:>6}  {r['confidence']:5.2f}  {_when(r['time'])}  "
              f"{json.dumps(r['key'], ensure_ascii=False)} → "
              f"{json.dumps(r['value'], ensure_ascii=False)}")
    if n < len(mem):
        print(f"({n} of {len(mem)} entries shown)")
    return 0


def _remove(a: argparse.Namespace) -> int:
    from perspective_jax.memory.writer import memory_writer

    if (a.key is None) == (a.id is None):
        raise UserError("remove takes KEY or --id N (one of them)")
    if a.model_dir is not None:
        from perspective_jax.memory.memory_file import load
        _check_model_dir(a, load(a.memory))
    with memory_writer(a.memory, timeout=a.lock_timeout) as mf:
        mem = mf.memory
        if a.key is not None:
            row: Optional[int] = mem.find(a.key)
            if row is None:
                raise UserError(f"memory {a.memory} has no entry with key "
                                f"{json.dumps(a.key, ensure_ascii=False)} (see "
                                "perspective-memory list)")
        else:
            found = np.flatnonzero(mem.ids == a.id)
            if not len(found):
                raise UserError(f"memory {a.memory} has no entry with id {a.id} (see "
                                "perspective-memory list)")
            row = int(found[0])
        entry_id, (key, value) = int(mem.ids[row]), mem.texts[row]
        mem.remove_rows([row])
        total = len(mem)
    print(f"removed entry {entry_id} ({json.dumps(key, ensure_ascii=False)} → "
          f"{json.dumps(value, ensure_ascii=False)}) from {a.memory}; it holds {total}")
    return 0


def _stats(a: argparse.Namespace) -> int:
    from perspective_jax.memory.memory_file import load

    mf = load(a.memory)
    _check_model_dir(a, mf)
    out = dict(mf.memory.stats())
    size = os.path.getsize(a.memory)
    out.update(file=a.memory, file_bytes=size,
               bytes_per_entry=round(size / out["entries"], 1) if out["entries"] else None,
               model=mf.model, codebook_in_dim=int(mf.centre.size),
               next_id=int(mf.memory.next_id))
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        for name, value in out.items():
            print(f"{name}: {value if not isinstance(value, float) else round(value, 3)}")
    return 0


COMMANDS = {"add": _add, "query": _query, "list": _list, "remove": _remove, "stats": _stats}


@cli_entry
def run(argv=None) -> int:
    a = _parser().parse_args(argv)
    if a.memory is None:
        raise UserError("--memory FILE is required (the memory file to use)")
    return COMMANDS[a.command](a)


main = exit_with(run)

if __name__ == "__main__":
    main()
