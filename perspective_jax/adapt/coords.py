"""Expert coordinates of the routed layers, the part of the router NES adapts
(SPEC §3.8). A routed layer's experts sit at z = wrap(lattice + offsets) on the
torus (`model.routed_ffn.TorusRouter`); adaptation reads and writes them as

    coords = {"layer_i": [P, E, 3]}      positions in [0, 1)³, one row per period

and applies them by replacing the routers' offsets with the shortest wrapped
displacement from the lattice point (`torus.signed_step`), so the model's routing
function is unchanged otherwise — in the parameter tree of `PerspectiveLM`
(`with_positions`) and in the streaming engine's per-layer parameters
(`engine_layer_params`) alike.
"""

from __future__ import annotations

import jax
import numpy as np

from perspective_jax.config import PerspectiveConfig
from perspective_jax.errors import UserError
from perspective_jax.moe import torus


def _lattice(cfg: PerspectiveConfig) -> np.ndarray:
    return np.asarray(torus.lattice_positions(cfg.moe.lattice), np.float32)


def routed_layer_names(cfg: PerspectiveConfig) -> list[str]:
    if not cfg.model.routed:
        return []
    return [f"layer_{i}" for i, kind in enumerate(cfg.model.layer_pattern) if kind == "pdr"]


def positions(params: dict, cfg: PerspectiveConfig) -> dict:
    """{layer_i: [P, E, 3]} the trained expert positions of `params`."""
    lat = _lattice(cfg)
    return {name: np.asarray(torus.wrap(lat + np.asarray(
                params["periods"][name]["ffn"]["router"]["offsets"], np.float32)))
            for name in routed_layer_names(cfg)}


def check_positions(coords: dict, cfg: PerspectiveConfig) -> None:
    want = (cfg.model.n_periods, cfg.moe.num_experts, 3)
    names = routed_layer_names(cfg)
    if sorted(coords) != sorted(names):
        raise UserError(f"expert coordinates name layers {sorted(coords)}; the model's "
                        f"routed layers are {names}")
    for name, z in coords.items():
        if tuple(np.shape(z)) != want:
            raise UserError(f"expert coordinates of {name}: shape {tuple(np.shape(z))}, "
                            f"the model needs {want}")


def offsets_for(coords_layer, cfg: PerspectiveConfig):
    """[..., E, 3] positions → router offsets (shortest wrapped step from the lattice)."""
    return torus.signed_step(_lattice(cfg), coords_layer).astype(np.float32)


def with_positions(params: dict, coords: dict, cfg: PerspectiveConfig) -> dict:
    """`params` (PerspectiveLM) with the routers of `coords`' layers at those positions."""
    periods = dict(params["periods"])
    for name, z in coords.items():
        layer = dict(periods[name])
        ffn = dict(layer["ffn"])
        ffn["router"] = {**ffn["router"], "offsets": offsets_for(z, cfg)}
        layer["ffn"] = ffn
        periods[name] = layer
    return {**params, "periods": periods}


def engine_positions(engine) -> dict:
    """{layer_i: [P, E, 3]} the expert positions the streaming engine routes with."""
    lat, out = _lattice(engine.cfg), {}
    for name in routed_layer_names(engine.cfg):
        i = int(name.split("_")[1])
        out[name] = np.stack([np.asarray(torus.wrap(lat + np.asarray(
            engine.layer_params[p][i]["ffn"]["router"]["offsets"], np.float32)))
            for p in range(engine.model.n_periods)])
    return out


def engine_layer_params(engine, coords: dict) -> list:
    """The engine's per-layer parameters ([p][i]) with the routers at `coords`."""
    check_positions(coords, engine.cfg)
    out = [list(row) for row in engine.layer_params]
    for name, z in coords.items():
        i = int(name.split("_")[1])
        off = offsets_for(np.asarray(z, np.float32), engine.cfg)
        for p in range(engine.model.n_periods):
            lp = out[p][i]
            ffn = dict(lp["ffn"])
            ffn["router"] = {**ffn["router"],
                             "offsets": jax.device_put(off[p], engine.device)}
            out[p][i] = {**lp, "ffn": ffn}
    return out
