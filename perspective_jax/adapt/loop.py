"""The adaptation loop (SPEC §3.8): LoRA on W_p by forward gradients, NES on the
routed layers' expert coordinates, rollback rails — the same code on the in-memory
model and the streaming engine (`adapt.target`).

    run = Adaptation(target, AdaptConfig())
    run.step(windows)                     # one update: K jvps → ĝ → optimiser; NES
    report = run.round(train_windows, heldout_windows, steps=10)   # rails around it

One update (`step`) on windows [B, T+1]:
  1. K directions v_k over the adapters (`forward_grad`: plain, orthogonal,
     antithetic, or guided by the run's recent estimates), d_k = ∇L · v_k from the
     target (one linearised forward pass, K tangents; on the engine layer by layer as
     the experts stream), ĝ = Σ_k w_k d_k v_k, then Adam (default) or SGD on the
     adapters; no backward pass.
  2. NES (if on): M perturbed copies of every routed layer's coordinates z [P, E, 3],
     fitness −L of each (M forward passes), centred ranks, wrapped update with the
     elastic anchor toward the trained positions (`nes`).
A round (`round`) checkpoints the adapters and coordinates, runs `steps` updates,
then the rails judge it on the held-out windows — their loss, and MPD's agreement
(the share of positions where the four routing views reach a decision, not
UNCERTAIN) — and roll it back, reported, when it went off them (`rails`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from perspective_jax.adapt.forward_grad import directions, guided_directions
from perspective_jax.adapt.nes import NESConfig, nes_update, perturbations
from perspective_jax.adapt.rails import Rails, RailsConfig
from perspective_jax.config.choices import ADAPT_OPTIMIZERS, FG_ESTIMATORS
from perspective_jax.config.schema import MPDConfig
from perspective_jax.errors import UserError
from perspective_jax.model.extensions import init_lora
from perspective_jax.model.mpd import PERSPECTIVES, UNCERTAIN, decide
from perspective_jax.moe.torus import wrap

GUIDE_DECAY = 0.9          # the guided estimator's running mean of its estimates


@dataclasses.dataclass(frozen=True)
class AdaptConfig:
    """LoRA (rank, target projections, scale), the forward-gradient update (directions
    K, estimator, optimiser, learning rate — constant, or cosine-decayed to a tenth
    over `decay_steps` updates; `adapt_a` False trains B alone, A frozen at
    its small random start — measured worse, docs/benchmarks.md issue 26), NES on
    coordinates (None: off), rails."""

    rank: int = 4
    targets: tuple = ("w_p",)
    scale: float = 1.0
    directions: int = 8
    estimator: str = "plain"
    optimizer: str = "adam"
    lr: float = 3e-2
    decay_steps: int = 0
    adapt_a: bool = True
    nes: Optional[NESConfig] = None
    rails: RailsConfig = RailsConfig()
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if not 1 <= self.rank <= 1024:
            raise UserError(f"adapter rank {self.rank}: must lie in 1..1024")
        if self.directions < 1:
            raise UserError(f"forward-gradient directions {self.directions}: must be >= 1")
        if self.estimator not in FG_ESTIMATORS:
            raise UserError(f"estimator {self.estimator!r}: use one of {FG_ESTIMATORS}")
        if self.estimator == "antithetic" and self.directions % 2:
            raise UserError("antithetic directions come in pairs: use an even number")
        if self.optimizer not in ADAPT_OPTIMIZERS:
            raise UserError(f"optimizer {self.optimizer!r}: use one of {ADAPT_OPTIMIZERS}")
        if not 0.0 < self.lr < 10.0:
            raise UserError(f"adaptation lr {self.lr}: must lie in (0, 10)")
        if self.decay_steps < 0:
            raise UserError(f"adaptation decay_steps {self.decay_steps}: must be >= 0")


def optimizer(cfg: AdaptConfig) -> optax.GradientTransformation:
    """Adam or SGD at `lr`, constant, or cosine-decayed to lr/10 over `decay_steps`."""
    lr = (optax.cosine_decay_schedule(cfg.lr, cfg.decay_steps, alpha=0.1)
          if cfg.decay_steps else cfg.lr)
    return optax.adam(lr) if cfg.optimizer == "adam" else optax.sgd(lr)


def mpd_agreement(target, windows, lora, coords=None, cfg: MPDConfig = MPDConfig()
                  ) -> float:
    """Share of the positions of `windows` where MPD's four views decide (not
    UNCERTAIN): what the rails watch."""
    views = [target.view_logits(windows, lora, coords, policy) for policy in PERSPECTIVES]
    logits = jnp.asarray(np.stack(views))
    probs = jax.nn.softmax(logits.reshape(len(PERSPECTIVES), -1, logits.shape[-1]), -1)
    return float(jnp.mean(decide(probs, cfg).kind != UNCERTAIN))


def _stack(coords: dict) -> tuple[list, jax.Array]:
    names = sorted(coords)
    return names, jnp.stack([jnp.asarray(coords[n], jnp.float32) for n in names])


def trainable_unravel(lora: dict, adapt_a: bool):
    """(unravel: a vector over the trained adapter entries → a full LoRA-shaped tree
    with zeros on the frozen ones, the vector's length). With `adapt_a` False only the
    B matrices are trained: A stays at its random start (as in LoRA-FA), and the
    directions are spent where the gradient is (∂L/∂A = 0 while B = 0)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(lora)
    trained = [adapt_a or getattr(path[-1], "key", None) == "b" for path, _ in leaves]
    shapes = [leaf.shape for _, leaf in leaves]
    sizes = [int(np.prod(s)) if t else 0 for s, t in zip(shapes, trained)]
    cuts = np.cumsum(sizes)[:-1]

    def unravel(v):
        parts = jnp.split(v, cuts)
        out = [p.reshape(s) if t else jnp.zeros(s, v.dtype)
               for p, s, t in zip(parts, shapes, trained)]
        return jax.tree.unflatten(treedef, out)
    return unravel, int(sum(sizes))


class Adaptation:
    """Adapters, coordinates and optimiser state of one adaptation run on `target`."""

    def __init__(self, target, cfg: AdaptConfig = AdaptConfig(), lora: Optional[dict] = None,
                 coords: Optional[dict] = None):
        self.target, self.cfg = target, cfg
        key = jax.random.key(cfg.seed)
        self.key, init_key = jax.random.split(key)
        self.lora = lora if lora is not None else init_lora(
            target.cfg.model, init_key, cfg.rank, cfg.targets)
        self.opt = optimizer(cfg)
        self.opt_state = self.opt.init(self.lora)
        self.trained = target.positions()
        self.coords = dict(coords) if coords else (
            {k: v.copy() for k, v in self.trained.items()} if cfg.nes else None)
        self._unravel, self.dim = trainable_unravel(self.lora, cfg.adapt_a)
        self.updates, self.update_s, self.rollbacks = 0, 0.0, []
        self._ema, self._recent = None, []
        self._kept = (float("nan"), float("nan"))
        self._apply = jax.jit(lambda g, s, p: self._apply_update(g, s, p))

    def _apply_update(self, g, state, params):
        updates, state = self.opt.update(g, state, params)
        return optax.apply_updates(params, updates), state

    def _next_key(self):
        self.key, sub = jax.random.split(self.key)
        return sub

    def _directions(self):
        """(directions [K, dim], weights [K]) of the configured estimator."""
        cfg, key = self.cfg, self._next_key()
        if cfg.estimator == "guided":
            return guided_directions(key, cfg.directions, self._guides())
        v = directions(key, cfg.directions, self.dim, cfg.estimator == "orthogonal",
                       cfg.estimator == "antithetic")
        return v, jnp.full((cfg.directions,), 1.0 / cfg.directions, jnp.float32)

    def _guides(self) -> jax.Array:
        """The guided estimator's guides: the running mean of the estimates and the
        latest K/2 − 1 estimates (none before the first update)."""
        if self._ema is None:
            return jnp.zeros((0, self.dim), jnp.float32)
        return jnp.stack([self._ema, *self._recent])

    def _remember(self, g: jax.Array) -> None:
        self._ema = g if self._ema is None else GUIDE_DECAY * self._ema + (1 - GUIDE_DECAY) * g
        self._recent = (self._recent + [g])[-(self.cfg.directions // 2 - 1):] \
            if self.cfg.directions >= 4 else []

    def gradient(self, windows) -> tuple[float, dict]:
        """(L, ĝ): the forward-gradient estimate on `windows` (module docstring, 1)."""
        v, weights = self._directions()
        tangents = jax.vmap(self._unravel)(v)
        loss, d = self.target.loss_and_derivatives(windows, self.lora, tangents, self.coords)
        g = jnp.sum((weights * jnp.asarray(d))[:, None] * v, axis=0)
        if self.cfg.estimator == "guided":
            self._remember(g)
        return loss, self._unravel(g)

    def nes(self, windows) -> None:
        """One NES update of the coordinates on `windows` (module docstring, 2)."""
        cfg = self.cfg.nes
        names, z = _stack(self.coords)
        _, z0 = _stack(self.trained)
        eps = perturbations(self._next_key(), z, cfg)
        fitness = [-self.target.loss(windows, self.lora,
                                     dict(zip(names, np.asarray(wrap(z + cfg.sigma * e)))))
                   for e in eps]
        z = np.asarray(nes_update(z, z0, eps, np.asarray(fitness), cfg))
        self.coords = dict(zip(names, z))

    def step(self, windows) -> float:
        """One update on `windows` [B, T+1]; returns the loss before it."""
        t0 = time.perf_counter()
        loss, g = self.gradient(windows)
        self.lora, self.opt_state = self._apply(g, self.opt_state, self.lora)
        if self.cfg.nes is not None:
            self.nes(windows)
        jax.block_until_ready(self.lora)
        self.update_s += time.perf_counter() - t0
        self.updates += 1
        return loss

    # ------------------------------------------------------------------ rails
    def state(self) -> dict:
        return {"lora": self.lora, "opt_state": self.opt_state, "coords": self.coords}

    def restore(self, state: dict) -> None:
        self.lora = jax.tree.map(jnp.asarray, state["lora"])
        self.opt_state = jax.tree.map(jnp.asarray, state["opt_state"])
        self.coords = state["coords"]

    def judge_on(self, heldout) -> tuple[float, float]:
        """(held-out loss, MPD agreement) of the current adapters and coordinates."""
        return (self.target.loss(heldout, self.lora, self.coords),
                mpd_agreement(self.target, heldout, self.lora, self.coords))

    def rails(self, heldout) -> Rails:
        """Rails whose baselines are the held-out loss and agreement now."""
        loss, agree = self.judge_on(heldout)
        self._kept = (loss, agree)            # what the state a rollback returns scores
        return Rails(self.cfg.rails, baseline_agreement=agree, baseline_loss=loss)

    def round(self, batches, heldout, rails: Rails) -> dict:
        """Checkpoint, one update per batch of `batches`, then the rails' verdict on
        `heldout` (rolled back when off the rails). Returns what happened."""
        rails.checkpoint(self.state())
        losses = [self.step(b) for b in batches]
        loss, agree = self.judge_on(heldout)
        kept, why = rails.judge(self.state(), agree, loss)
        if why is not None:
            self.restore(kept)
            self.rollbacks.append(why)
            loss, agree = self._kept
        else:                 # the loss baseline only ratchets down; agreement's stays
            rails.baseline_loss = min(rails.baseline_loss, loss)
            self._kept = (loss, agree)
        return {"train_loss": float(np.mean(losses)) if losses else float("nan"),
                "heldout_loss": loss, "agreement": agree, "rolled_back": why}
