"""Save and restore a decode cache (PDR states + KV rings + positions), bit-exact.

A conversation can be resumed later: `save_cache(cache, path)` writes a
safetensors file with one tensor per cache leaf (keys are '/'-joined pytree
paths); `load_cache(path, cfg)` checks every tensor against the layout that
`init_cache(cfg, batch)` would produce and refuses mismatches.

Checked files (`write_checked` / `read_checked`, also used for conversation
states): the metadata holds a format string and the sha256 of the content —
every tensor's name, dtype, shape and bytes, and every other metadata field — so
an edited position or any flipped byte is refused with the file's name; files
of an older format (no checksum) are refused, not read unverified.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.numpy import load_file, save

from perspective_jax.config import ModelConfig
from perspective_jax.errors import UserError
from perspective_jax.fileio import atomic_write
from perspective_jax.model.transformer import init_cache

FORMAT = "perspective-cache/2"        # 2: content sha256 in the metadata
OLDER_FORMATS = ("perspective-cache/1",)
CHECKSUM = "sha256"                   # metadata key of the content checksum


def _part(p) -> str:
    """One pytree path entry as a name: dict key, NamedTuple field (`PDRCache.state`,
    `KVCache.k`…) or sequence index — the same strings the dict caches had."""
    for attr in ("key", "name", "idx"):
        if hasattr(p, attr):
            return str(getattr(p, attr))
    return str(p)


def _key(path) -> str:
    return "/".join(_part(p) for p in path)


def flatten_cache(cache) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(cache)[0]
    return {_key(path): np.asarray(leaf) for path, leaf in leaves}


def unflatten_paths(flat: dict) -> dict:
    """Inverse of `flatten_cache`'s keys: '/'-joined paths → nested dicts."""
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def content_digest(tensors: dict, meta: dict) -> str:
    """sha256 over the metadata (but its checksum) and every tensor in name order:
    name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != CHECKSUM},
                                  sort_keys=True).encode())
    for key in sorted(tensors):
        a = np.ascontiguousarray(tensors[key])
        h.update(json.dumps([key, a.dtype.str, list(a.shape)]).encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def write_checked(tensors: dict, meta: dict, path: str) -> None:
    """`tensors` with `meta` and its content checksum, written atomically (a full disk
    is a one-line error, `fileio.atomic_write`)."""
    meta = {**meta, CHECKSUM: content_digest(tensors, meta)}
    atomic_write(path, save(tensors, metadata=meta))


def read_checked(path: str, fmt: str, what: str, older=(),
                 remedy: str = "start anew") -> tuple[dict, dict]:
    """(tensors, metadata) of a file `write_checked` wrote with format `fmt`; anything
    else — unreadable, another or an `older` format, a failed checksum — is a one-line
    UserError naming `path` (`what`: 'a conversation state file', …; `remedy`: what
    the user can do)."""
    try:
        tensors = load_file(path)
        with safe_open(path, "np") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not {what} ({exc})") from None
    got = meta.get("format")
    if got in older:
        raise UserError(f"{path}: written in the older format {got!r}, which has no "
                        f"checksum and cannot be verified; {remedy}")
    if got != fmt:
        raise UserError(f"{path}: not {what} (format {got!r}, expected {fmt!r})")
    if meta.get(CHECKSUM) != content_digest(tensors, meta):
        raise UserError(f"{path}: its content fails its sha256 checksum (edited or "
                        f"corrupt); the state file is damaged — {remedy}")
    return tensors, meta


def save_cache(cache, path: str) -> None:
    """Write a decode cache atomically, with its checksum (`write_checked`)."""
    write_checked(flatten_cache(cache), {"format": FORMAT}, path)


def load_cache(path: str, cfg: ModelConfig):
    """The decode cache `save_cache` wrote, verified and checked against `cfg`."""
    if not os.path.isfile(path):
        raise UserError(f"cache file not found: {path}")
    tensors, _ = read_checked(path, FORMAT, "a readable cache file", OLDER_FORMATS,
                              "save the cache again with this version")
    return cache_from_tensors(tensors, cfg, path)


def cache_from_tensors(tensors: dict, cfg: ModelConfig, source: str, allowed_extra=()):
    """The cache pytree from flat tensors, each checked against `init_cache`'s layout
    (name, shape, dtype); tensors other than the cache's and `allowed_extra` are refused."""
    if "next_pos" not in tensors or tensors["next_pos"].ndim != 1:
        raise UserError(f"{source}: not a Perspective decode cache (no next_pos tensor)")
    template = init_cache(cfg, tensors["next_pos"].shape[0])
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for tpath, like in flat:
        key = _key(tpath)
        if key not in tensors and key.endswith("/route"):
            # saved before routers kept a context average: only models without one
            # (route_smoothing 0, which never read it) existed then
            leaves.append(jnp.zeros(like.shape, like.dtype))
            continue
        if key not in tensors:
            raise UserError(f"{source}: missing cache tensor {key!r}; was it saved for "
                            "another model config?")
        got = tensors[key]
        if got.shape != like.shape or got.dtype != like.dtype:
            raise UserError(f"{source}: cache tensor {key!r} is {got.dtype}{list(got.shape)}, "
                            f"this model expects {like.dtype}{list(like.shape)}")
        leaves.append(jnp.asarray(got))
    extra = set(tensors) - {_key(p) for p, _ in flat} - set(allowed_extra)
    if extra:
        raise UserError(f"{source}: unexpected cache tensors {sorted(extra)[:3]}")
    return jax.tree_util.tree_unflatten(treedef, leaves)
