"""YAML → `PerspectiveConfig`: `base_config:` inheritance, dotted overrides,
type checking, and unknown keys rejected with the closest valid key. A key given
twice in one mapping and an empty file are errors (PyYAML keeps the last duplicate).

    cfg = load_config("curricula/tiny.yaml", ["model.d_model=256", "train.steps=50"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from typing import Any, Iterable, Mapping

import yaml

from perspective_jax.config.schema import PerspectiveConfig
from perspective_jax.errors import ConfigError

BASE_KEY = "base_config"
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        lines: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in lines:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given at line "
                        f"{lines[key]}); keep one", key_node.start_mark)
                lines[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: SafeLoader reports it below
                pass
        return super().construct_mapping(node, deep)


def _suggest(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against the type `hint` and convert YAML forms (list→tuple)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if not INT64_MIN <= value <= INT64_MAX:
            raise ConfigError(f"{where}: {value} is out of range; use an integer that fits "
                              "64 bits (|value| < 2**63)")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads '3e-3' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond the float range
            raise ConfigError(f"{where}: number too large; expected a finite number") from None
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {hint!r}")  # schema bug


def from_dict(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    """Build the dataclass `cls` from a nested mapping, validating every key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}{_suggest(str(key), names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value or {}, path)
        else:
            kwargs[key] = _coerce(value, hint, path)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - from_dict checks names first
        raise ConfigError(f"{where or 'config'}: {exc}") from None


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def _deep_merge(base: dict, top: Mapping) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml_tree(path: str, _seen: tuple[str, ...] = ()) -> dict:
    """Read a YAML file and merge it over its `base_config` chain."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f"{path}: base_config cycle through {' -> '.join(_seen)}")
    if os.path.isdir(path):
        raise ConfigError(f"config path {path} is a directory; pass a YAML file "
                          "(presets live in curricula/)")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}; pass an existing YAML file "
                          "(presets live in curricula/)")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"{path}: invalid YAML{at}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; pass a YAML config") from None
    except (ValueError, OverflowError) as exc:  # e.g. a date like 2020-13-45
        raise ConfigError(f"{path}: invalid YAML value: {exc}; quote it") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    if data is None:
        raise ConfigError(f"{path}: the config file is empty; give at least one section "
                          "(e.g. 'base_config: tiny.yaml') or leave out --config")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: {BASE_KEY} must be a path to a YAML file, got {base!r}")
    base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
    return _deep_merge(read_yaml_tree(base_path, _seen + (path,)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'model.d_model=256' → (['model', 'd_model'], 256). Values parse as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, OverflowError):
        value = raw
    return parts, value


def apply_overrides(tree: dict, overrides: Iterable[str]) -> dict:
    tree = dict(tree)
    for text in overrides:
        parts, value = parse_override(text)
        patch: Any = value
        for part in reversed(parts):
            patch = {part: patch}
        tree = _deep_merge(tree, patch)
    return tree


def load_config(path: str | None = None, overrides: Iterable[str] = ()) -> PerspectiveConfig:
    """Resolve a YAML preset (or the defaults) plus dotted overrides."""
    tree = read_yaml_tree(path) if path else {}
    tree = apply_overrides(tree, overrides)
    return from_dict(PerspectiveConfig, tree)


def save_config(cfg: PerspectiveConfig, path: str) -> None:
    """Write the resolved config (a complete YAML, no base_config) next to a run."""
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
