"""Where the routed FFNs live in a parameter (or aux) tree, defined once.

Every routed FFN is `tree["periods"][f"layer_{i}"]["ffn"]` for the pattern positions
i of PDR layers (stacked over periods on axis 0); expert layer j of a model directory
is the j-th (period, position) pair in execution order.
"""

from __future__ import annotations

from typing import Callable

from perspective_jax.config.schema import ModelConfig


def routed_positions(cfg: ModelConfig) -> list[int]:
    """Pattern positions whose FFN is routed when the model is (every PDR layer)."""
    return [i for i, kind in enumerate(cfg.layer_pattern) if kind == "pdr"]


def expert_layers(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(period, pattern position) of every routed layer, in execution order."""
    return [(p, i) for p in range(cfg.n_periods) for i in routed_positions(cfg)]


def routed_ffns(tree: dict, cfg: ModelConfig) -> list[tuple[int, dict]]:
    """[(position i, the FFN subtree at periods/layer_i/ffn)] of a routed tree."""
    return [(i, tree["periods"][f"layer_{i}"]["ffn"]) for i in routed_positions(cfg)]


def map_routed_ffns(tree: dict, cfg: ModelConfig, fn: Callable[[int, dict], dict]) -> dict:
    """A copy of `tree` whose routed FFN subtrees are fn(i, a shallow copy of it); the
    rest of the tree is shared, not copied."""
    periods = dict(tree["periods"])
    for i in routed_positions(cfg):
        name = f"layer_{i}"
        layer = dict(periods[name])
        layer["ffn"] = fn(i, dict(layer["ffn"]))
        periods[name] = layer
    return {**tree, "periods": periods}
