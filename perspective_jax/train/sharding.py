"""Device mesh from config and logical-axis → mesh-axis rules (MaxText style).

Mesh axes: data, fsdp, expert, tensor (all `AxisType.Auto`). Parameters carry
logical names (`embed`, `mlp`, `heads`, …, see `model/layers.py`); `RULES`
maps each to a mesh axis. A parameter dimension that the mapped mesh axis does
not divide is replicated instead, so any config runs on any mesh.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from perspective_jax.config import MeshConfig
from perspective_jax.config.choices import BATCH_AXES, MESH_AXES
from perspective_jax.errors import UserError


RULES: dict[str, str | None] = {
    "batch": None,          # activations: see BATCH_AXES
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "pdr_rows": "tensor",
    "pdr_rank": None,
    "norm": None,
    "layers": None,
    "expert": "expert",
}


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
    sizes = [getattr(cfg, a) for a in MESH_AXES]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % fixed:
            raise UserError(f"mesh: {n_devices} devices are not divisible by the fixed axes "
                            f"({dict(zip(MESH_AXES, sizes))}); change the mesh.* sizes")
        sizes[sizes.index(-1)] = n_devices // fixed
    if math.prod(sizes) != n_devices:
        raise UserError(f"mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices "
                        f"but {n_devices} are available; set one mesh axis to -1")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def spec_for(logical: P | None, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Map one parameter's logical PartitionSpec to a mesh PartitionSpec."""
    if logical is None:
        return P()
    out, used = [], set()
    for name, dim in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
        axis = RULES.get(name) if name is not None else None
        if axis is None or axis in used or dim % mesh.shape[axis]:
            out.append(None)
        else:
            out.append(axis)
            used.add(axis)
    return P(*out)


def param_shardings(logical_tree, abstract_params, mesh: Mesh):
    """NamedSharding per parameter (same tree as the params)."""
    return jax.tree.map(
        lambda spec, a: NamedSharding(mesh, spec_for(spec, a.shape, mesh)),
        logical_tree, abstract_params, is_leaf=lambda x: isinstance(x, P) or x is None)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[B, T] arrays: batch over (data, fsdp, expert), sequence replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, None))


def batch_divisor(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_global(tree, shardings):
    """Host values (numpy or single-device arrays, the same on every process) → global
    arrays laid out by `shardings` (same tree); each process places its own shards."""
    def put(x, sharding):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
    return jax.tree.map(put, tree, shardings)
