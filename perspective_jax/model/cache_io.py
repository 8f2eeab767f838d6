"""Save and restore a decode cache (PDR states + KV rings + positions), bit-exact.

A conversation can be resumed later: `save_cache(cache, path)` writes a
safetensors file with one tensor per cache leaf (keys are '/'-joined pytree
paths); `load_cache(path, cfg)` checks every tensor against the layout that
`init_cache(cfg, batch)` would produce and refuses mismatches.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from perspective_jax.config import ModelConfig
from perspective_jax.errors import UserError
from perspective_jax.model.transformer import init_cache

FORMAT = "perspective-cache/1"


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


def save_cache(cache, path: str) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a file."""
    tmp = f"{path}.tmp"
    save_file(flatten_cache(cache), tmp, metadata={"format": FORMAT})
    os.replace(tmp, path)


def load_cache(path: str, cfg: ModelConfig):
    if not os.path.isfile(path):
        raise UserError(f"cache file not found: {path}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable cache file ({exc})") from None
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
