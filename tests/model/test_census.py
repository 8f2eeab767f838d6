"""The census reproduces SPEC §2 for the 1.05T preset, from abstract shapes."""

import math

import jax

from perspective_jax.model.census import census, summary
from perspective_jax.config import load_config
from perspective_jax.model.transformer import init_params


def within(value, target, rel=0.005):
    return abs(value - target) / target < rel


def test_full_preset_matches_spec_section_2(repo):
    full = load_config(str(repo / "curricula" / "perspective-1t.yaml"))
    cfg = full.model
    comps = {c.name: c for c in census(cfg, full.moe)}
    assert within(comps["PDR mixer"].per_layer, 52.4e6)
    assert comps["PDR mixer"].count == 60
    assert within(comps["GQA mixer"].per_layer, 41.9e6)
    assert comps["GQA mixer"].count == 20
    assert within(comps["shared FFN (after GQA)"].per_layer, 135.3e6)
    assert comps["routed experts (after PDR)"].count == 60
    assert within(comps["routed experts (after PDR)"].per_layer, 128 * 135.3e6)
    info = summary(cfg, full.moe)
    assert within(info["shared_params"], 6.83e9)
    assert within(info["expert_params"], 1039e9)
    assert within(info["total_params"], 1.046e12)
    assert within(info["active_params_per_token"], 14.95e9)


def test_dense_build_of_the_full_preset(repo):
    """Before upcycling, each PDR layer has one dense FFN: total = active ≈ 14.95B."""
    import dataclasses
    cfg = load_config(str(repo / "curricula" / "perspective-1t.yaml")).model
    info = summary(dataclasses.replace(cfg, routed=False))
    assert within(info["total_params"], 14.95e9) and info["expert_params"] == 0
    assert info["active_params_per_token"] == info["total_params"]


def test_census_equals_real_parameter_count(small_cfg):
    params = init_params(small_cfg, jax.random.key(0))
    real = sum(math.prod(a.shape) for a in jax.tree.leaves(params))
    assert summary(small_cfg)["total_params"] == real
    by_name = {c.name: c for c in census(small_cfg)}
    d, r = small_cfg.d_model, small_cfg.pdr_rank
    assert by_name["PDR mixer"].per_layer == 3 * d * d + 2 * r * d + d  # + b_p
    assert by_name["shared FFN (after GQA)"].per_layer == 3 * d * small_cfg.d_ff
