"""Natural-evolution-strategy updates of expert coordinates on the torus (SPEC §3.8).

    z_new = nes_step(fitness, z, z0, key, NESConfig())

z [E, 3] (one routed layer's coordinates in [0, 1)³), z0 the trained positions.
M perturbations as antithetic pairs ε_i ~ N(0, I) (M/2 drawn, ±ε), fitness
f_i = fitness(wrap(z + σ ε_i)) (−loss on recent tokens), centred ranks
u_i = rank(f_i)/(M − 1) − ½ (shaping: only the order counts), then

    step  = lr / (M σ) · Σ_i u_i ε_i  −  lr · 2λ · signed_step(z0, z)
    z_new = wrap(z + step)                       (fold in place: `torus.fold_step`)

`signed_step(z0, z)` is the shortest wrapped displacement from z0 to z, so the
elastic anchor λ‖z − z0‖² pulls across the seam the short way. With rank shaping
the first term's size does not shrink near an optimum: a coordinate moves by up to
≈ 0.3·lr/σ per update (0.006 with the defaults, a fortieth of a 4-cell lattice
spacing), so lr/σ sets the step.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from perspective_jax.errors import UserError
from perspective_jax.moe.torus import fold_step, signed_step, wrap


@dataclasses.dataclass(frozen=True)
class NESConfig:
    """M perturbations (even: antithetic pairs), σ, learning rate, anchor λ."""

    population: int = 16
    sigma: float = 0.01
    lr: float = 2e-4
    anchor: float = 0.1

    def __post_init__(self):
        if self.population < 2 or self.population % 2:
            raise UserError(f"NES population {self.population}: must be an even number "
                            ">= 2 (antithetic pairs)")
        if not 0.0 < self.sigma < 0.5:
            raise UserError(f"NES sigma {self.sigma}: must lie in (0, 0.5)")
        if self.lr <= 0 or self.anchor < 0:
            raise UserError("NES lr must be > 0 and anchor >= 0")


def centred_ranks(f: jax.Array) -> jax.Array:
    """rank(f_i)/(M − 1) − ½ ∈ [−½, ½] (the lowest fitness −½, the highest ½); tied
    values share their mean rank, so equal fitness moves nothing."""
    less = jnp.sum(f[None, :] < f[:, None], axis=1)
    equal = jnp.sum(f[None, :] == f[:, None], axis=1)
    ranks = less + (equal - 1) / 2.0
    return ranks.astype(jnp.float32) / (f.shape[0] - 1) - 0.5


def perturbations(key: jax.Array, z: jax.Array, cfg: NESConfig = NESConfig()) -> jax.Array:
    """ε [M, *z.shape]: M/2 Gaussian draws and their negatives (antithetic pairs)."""
    half = jax.random.normal(key, (cfg.population // 2, *z.shape), jnp.float32)
    return jnp.concatenate([half, -half])


def nes_update(z: jax.Array, z0: jax.Array, eps: jax.Array, fitness_values,
               cfg: NESConfig = NESConfig()) -> jax.Array:
    """z after one update from the fitness f_i of wrap(z + σ ε_i) (module docstring)."""
    u = centred_ranks(jnp.asarray(fitness_values, jnp.float32))
    grad = jnp.tensordot(u, eps, axes=1) / (cfg.population * cfg.sigma)
    step = cfg.lr * grad - cfg.lr * 2.0 * cfg.anchor * signed_step(z0, z)
    return fold_step(z, step)


def nes_step(fitness: Callable, z: jax.Array, z0: jax.Array, key: jax.Array,
             cfg: NESConfig = NESConfig()) -> jax.Array:
    """One NES update of z [..., 3] (module docstring); `fitness(z) → scalar` a JAX
    function (vmapped over the population; `perturbations` + `nes_update` take
    fitness values computed any other way, e.g. on the streaming engine)."""
    eps = perturbations(key, z, cfg)
    f = jax.vmap(lambda e: fitness(wrap(z + cfg.sigma * e)))(eps)
    return nes_update(z, z0, eps, f, cfg)
