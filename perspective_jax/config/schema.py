"""The configuration schema: nested frozen dataclasses validated on construction.

YAML files (``curricula/*.yaml``) supply values; this module owns the names,
types, defaults and the invariants between fields. Every size used by the
model comes from here — there are no magic constants in the modules.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from perspective_jax.config.choices import (BINARY_FILES, DELTA_FORMS, DISPATCH_IMPLS, DTYPES, GATES,
                                            LAYER_KINDS, MPD_CONFIDENCES, MPD_STATES, PDR_IMPLS, REMAT_POLICIES,
                                            SCALE_GRANULARITIES, SEED_RANGE, TOKENIZERS)
from perspective_jax.errors import ConfigError


def _require(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{field}: {message}")


def _seed(value: int, field: str) -> None:
    lo, hi = SEED_RANGE
    _require(lo <= value <= hi, field, f"must lie in [{lo}, {hi}], got {value}")


def _positive(obj, *names: str, section: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value > 0, f"{section}.{name}", f"must be > 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes and options of the Perspective network (SPEC §2, §3.1, §3.2)."""

    vocab_size: int = 512
    d_model: int = 128
    n_layers: int = 4
    # One period of the layer stack; the stack repeats it n_layers / len times.
    layer_pattern: tuple[str, ...] = ("pdr", "pdr", "pdr", "gqa")
    d_ff: int = 384
    # PDR (SPEC §3.1)
    pdr_rank: int = 32
    pdr_chunk: int = 16
    # pdr_impl=matmul: diagonal block of the matmul-shaped chunk (divides pdr_chunk)
    pdr_sub: int = 4
    pdr_init_decay: float = 0.95
    pdr_init_noise: float = 0.01
    # Upper bound on any decay so the state stays bounded over unbounded
    # contexts (|S| ≤ |v kᵀ| / (1 − max)); float32 sigmoid would round to 1.
    pdr_max_decay: float = 0.99999
    pdr_impl: str = "auto"        # auto: Pallas on a GPU, else matmul (d >= 256) / chunked
    # Windowed GQA (SPEC §3.2)
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    window: int = 64
    rope_theta: float = 10000.0
    # Norms and numerics
    norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    # FFN after each PDR layer: one dense SwiGLU, or routed experts (moe.*).
    routed: bool = False

    def __post_init__(self):
        s = "model"
        _positive(self, "vocab_size", "d_model", "n_layers", "d_ff", "pdr_rank",
                  "pdr_chunk", "pdr_sub", "n_heads", "n_kv_heads", "head_dim", "window",
                  "rope_theta", "norm_eps", section=s)
        _require(len(self.layer_pattern) > 0, f"{s}.layer_pattern", "must not be empty")
        for kind in self.layer_pattern:
            _require(kind in LAYER_KINDS, f"{s}.layer_pattern",
                     f"unknown layer kind {kind!r}; use one of {LAYER_KINDS}")
        _require(self.n_layers % len(self.layer_pattern) == 0, f"{s}.n_layers",
                 f"{self.n_layers} is not divisible by the period "
                 f"len(layer_pattern)={len(self.layer_pattern)}")
        _require(self.n_heads % self.n_kv_heads == 0, f"{s}.n_heads",
                 f"{self.n_heads} query heads are not divisible by "
                 f"n_kv_heads={self.n_kv_heads}")
        _require(self.head_dim % 2 == 0, f"{s}.head_dim",
                 f"RoPE needs an even head_dim, got {self.head_dim}")
        _require(0.0 < self.pdr_init_decay < 1.0, f"{s}.pdr_init_decay",
                 f"must lie in (0, 1), got {self.pdr_init_decay}")
        _require(self.pdr_init_decay < self.pdr_max_decay < 1.0, f"{s}.pdr_max_decay",
                 f"must lie in (pdr_init_decay, 1), got {self.pdr_max_decay}")
        _require(self.pdr_init_noise >= 0, f"{s}.pdr_init_noise", "must be >= 0")
        _require(self.pdr_impl in PDR_IMPLS, f"{s}.pdr_impl",
                 f"unknown {self.pdr_impl!r}; use one of {PDR_IMPLS}")
        _require(self.pdr_impl != "matmul" or self.pdr_chunk % self.pdr_sub == 0,
                 f"{s}.pdr_sub", f"{self.pdr_sub} does not divide pdr_chunk={self.pdr_chunk}")
        for name in ("dtype", "param_dtype"):
            _require(getattr(self, name) in DTYPES, f"{s}.{name}",
                     f"unknown dtype {getattr(self, name)!r}; use one of {DTYPES}")
        _require(self.remat in REMAT_POLICIES, f"{s}.remat",
                 f"unknown policy {self.remat!r}; use one of {REMAT_POLICIES}")

    @property
    def n_periods(self) -> int:
        return self.n_layers // len(self.layer_pattern)

    @property
    def n_pdr_layers(self) -> int:
        return self.n_periods * self.layer_pattern.count("pdr")

    @property
    def n_gqa_layers(self) -> int:
        return self.n_periods * self.layer_pattern.count("gqa")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Routed experts on the torus lattice (SPEC §3.3). The FFN after every PDR
    layer becomes routed once the `upcycle` stage runs."""

    num_experts: int = 8
    lattice: tuple[int, int, int] = (2, 2, 2)
    router_temperature: float = 1.0
    learn_temperature: bool = True
    # std of W_route entries × √d: z = h·W_route spreads over ~this many torus turns
    route_init_scale: float = 1.0
    # λ of the router's context average: z_t = wrap(Σ_s λ^{t-s} W h_s / Σ_s λ^{t-s}),
    # restarted where segment_pos is 0 (model/routed_ffn.context_average). 0 routes
    # each token on its own state; near 1 the route follows the context, so adjacent
    # tokens stay on the same or a neighbouring expert (streaming, SPEC §3.5)
    route_smoothing: float = 0.0
    offset_init_scale: float = 0.01
    # straight_through: gate value 1 in the forward pass (upcycling is exact),
    # gradient of g to the router; softmax: output scaled by g itself.
    gate: str = "straight_through"
    dispatch: str = "auto"          # auto | ragged | blocked | dense
    dispatch_block: int = 128
    upcycle_noise: float = 0.01     # relative std of the noise added per expert
    balance_weight: float = 0.01
    # 10 with delta_form=ternary (its gradient per weight is ~1/(s·#weights), so a
    # small weight does nothing); SPEC §3.3's β = 0.001 is for delta_form=float
    delta_weight: float = 10.0
    # distance the delta loss measures between lattice-neighbour experts
    # (model/expert_sharing.py): float weights, or their ternary codes (trits, STE)
    delta_form: str = "ternary"
    smoothness_weight: float = 0.005
    # −log of the router mass token t+1 puts on token t's expert and its lattice
    # neighbours (model/routed_ffn.locality_loss): routing that stays local
    locality_weight: float = 0.0
    # align stage: weights within this distance (in units of the ternary scale) of a
    # trit threshold are moved across it to agree with their lattice neighbours'
    # majority trit before the align fine-tune (moe/align.consensus_snap); 0 = off
    align_consensus: float = 0.05
    # weight of the expert-predictor heads' cross-entropy (prefetch; 0 = not trained)
    predictor_weight: float = 1.0

    def __post_init__(self):
        s = "moe"
        _positive(self, "num_experts", "router_temperature", section=s)
        _require(len(self.lattice) == 3 and all(n > 0 for n in self.lattice),
                 f"{s}.lattice", f"must be three positive sizes, got {self.lattice}")
        _require(math.prod(self.lattice) == self.num_experts, f"{s}.lattice",
                 f"{'x'.join(map(str, self.lattice))} = {math.prod(self.lattice)} cells "
                 f"but num_experts={self.num_experts}; make them equal")
        for name in ("offset_init_scale", "balance_weight", "delta_weight",
                     "smoothness_weight", "locality_weight", "upcycle_noise",
                     "route_init_scale", "predictor_weight"):
            _require(getattr(self, name) >= 0, f"{s}.{name}", "must be >= 0")
        _require(0.0 <= self.route_smoothing < 1.0, f"{s}.route_smoothing",
                 f"must be in [0, 1) (the context average's decay), "
                 f"got {self.route_smoothing}")
        _require(self.delta_form in DELTA_FORMS, f"{s}.delta_form",
                 f"use one of {', '.join(DELTA_FORMS)}, got {self.delta_form!r}")
        _require(0.0 <= self.align_consensus <= 0.5, f"{s}.align_consensus",
                 f"must be in [0, 0.5] (a distance to the trit threshold 0.5), "
                 f"got {self.align_consensus}")
        _require(self.gate in GATES, f"{s}.gate",
                 f"use 'straight_through' or 'softmax', got {self.gate!r}")
        _require(self.dispatch in DISPATCH_IMPLS, f"{s}.dispatch",
                 f"use auto, ragged, blocked or dense, got {self.dispatch!r}")
        _positive(self, "dispatch_block", section=s)


@dataclasses.dataclass(frozen=True)
class TernaryConfig:
    """Ternary experts (SPEC §3.4): progressive schedule and distillation."""

    # Experts are ternary (set by the `ternary` stage and everything after it).
    enabled: bool = False
    # Share of expert weights (by magnitude) ternarised at each phase of the stage.
    schedule: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    # Steps the schedule's equal phases span; 0 = train.steps. Training pins it at
    # the stage's first start (written to its config.yaml) and keeps it on resume,
    # so raising train.steps of a finished ternary run continues fully ternary.
    schedule_steps: int = 0
    ce_weight: float = 0.5
    kd_weight: float = 0.5
    # 0 = off, 8 = per-token absmax int8 expert activations (when enabled).
    activation_bits: int = 0
    scale_granularity: str = "tensor"

    def __post_init__(self):
        s = "ternary"
        _require(len(self.schedule) > 0, f"{s}.schedule", "must not be empty")
        _require(all(0.0 <= f <= 1.0 for f in self.schedule), f"{s}.schedule",
                 f"fractions must lie in [0, 1], got {self.schedule}")
        _require(list(self.schedule) == sorted(self.schedule), f"{s}.schedule",
                 "must be non-decreasing")
        _require(self.schedule_steps >= 0, f"{s}.schedule_steps",
                 f"must be >= 0 (0 = train.steps), got {self.schedule_steps}")
        _require(self.ce_weight >= 0 and self.kd_weight >= 0, f"{s}.ce_weight",
                 "loss weights must be >= 0")
        _require(self.activation_bits in (0, 8), f"{s}.activation_bits",
                 f"use 0 (float activations) or 8 (per-token int8), got {self.activation_bits}")
        _require(self.scale_granularity in SCALE_GRANULARITIES, f"{s}.scale_granularity",
                 f"use 'tensor' or 'row', got {self.scale_granularity!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where text comes from and how it is cut into training sequences."""

    # Corpus used when --data is not given: a file, directory or glob (relative
    # paths resolve against the current directory); None = the default corpus.
    path: Optional[str] = None
    tokenizer: str = "sentencepiece"
    seq_len: int = 128
    val_fraction: float = 0.1
    seed: int = 0
    # a corpus file that is not text (NUL bytes, mostly invalid UTF-8): skip | refuse
    binary_files: str = "skip"

    def __post_init__(self):
        s = "data"
        _require(self.tokenizer in TOKENIZERS, f"{s}.tokenizer",
                 f"use 'sentencepiece' or 'byte', got {self.tokenizer!r}")
        _require(self.binary_files in BINARY_FILES, f"{s}.binary_files",
                 f"use one of {BINARY_FILES}, got {self.binary_files!r}")
        _seed(self.seed, f"{s}.seed")
        _positive(self, "seq_len", section=s)
        _require(0.0 < self.val_fraction < 1.0, f"{s}.val_fraction",
                 f"must lie in (0, 1), got {self.val_fraction}")


@dataclasses.dataclass(frozen=True)
class MPDConfig:
    """Multi-Perspective Decoding (SPEC §3.6; `model.mpd`): τ (agreement threshold,
    nats), min_votes (of the 4 views) for a majority, and the trigger — every
    `every_k`-th position (0: never by position), P0's top probability below `p_min`,
    or P0's entropy (nats) above `h_max`; `state`: how the views keep state
    (MPD_STATES: "forked" from P0's state per triggered token, or "persistent");
    `confidence` (MPD_CONFIDENCES): "ensemble" — the views' mean probability of the
    emitted token (the default: calibrated, docs/benchmarks.md issue 20) — or
    "agreement", SPEC's 1 − agree/τ, votes/4 · mean voted probability, 0 when
    uncertain (a measure of the views' agreement, not of correctness)."""

    tau: float = 0.15
    min_votes: int = 3
    every_k: int = 8
    p_min: float = 0.6
    h_max: float = 3.0
    state: str = "forked"
    confidence: str = "ensemble"
    max_rate: float = 0.1

    # `max_rate`: MPD runs on at most this share of tokens — a trigger is honoured
    # only while triggers so far < max_rate · (tokens so far + 1) — so decoding keeps
    # ≥ 1 / (1 + max_rate · c) of its rate, c = one trigger's cost in P0 steps
    # (measured 3.4–4.3 on the streaming engine: ≥ 0.70 at 0.1, SPEC's 8-vs-12
    # tok/s gate; docs/benchmarks.md issue 20). 1 = no cap.

    def __post_init__(self):
        s = "mpd"
        _require(0.0 < self.max_rate <= 1.0, f"{s}.max_rate",
                 f"must lie in (0, 1], got {self.max_rate}")
        _require(self.confidence in MPD_CONFIDENCES, f"{s}.confidence",
                 f"use one of {MPD_CONFIDENCES}, got {self.confidence!r}")
        _require(self.state in MPD_STATES, f"{s}.state",
                 f"use one of {MPD_STATES}, got {self.state!r}")
        _require(0.0 < self.tau <= math.log(2), f"{s}.tau",
                 f"must lie in (0, ln 2 = 0.693], got {self.tau}")
        _require(2 <= self.min_votes <= 4, f"{s}.min_votes",
                 f"must lie in 2..4 (of four perspectives), got {self.min_votes}")
        _require(self.every_k >= 0, f"{s}.every_k", f"must be >= 0, got {self.every_k}")
        _require(0.0 <= self.p_min <= 1.0, f"{s}.p_min", f"must lie in [0, 1], got {self.p_min}")
        _require(self.h_max >= 0, f"{s}.h_max", f"must be >= 0, got {self.h_max}")


@dataclasses.dataclass(frozen=True)
class SafetyConfig:
    """The `safety` stage (SPEC §3.9; `perspective_jax.safety.build`): which text is
    safe and which strings are flagged, and how the polytope is built from the final
    hidden states (RMSNorm(x), before the head) of the safe text.

    `safe_data`: files/directories/globs of vetted safe text (empty: the run's own
    corpus); windows containing a flagged string are dropped from it. `flagged`:
    strings the model must not emit (plus one per line of `flagged_file`).
    `anchors`: k-means centres of the safe states (~1000 at full scale);
    `pca_directions` + `random_directions` support half-spaces over them;
    `max_states` safe states gathered, `heldout_fraction` of them held out to choose
    the inflation ε so at most `fp_target` of held-out safe states fall outside the
    support half-spaces. Flagged-token caps (logits): `flag_cap`, or by default the
    `flag_quantile` quantile of the top logit over the safe states minus `flag_margin`.
    `working_set`, `max_iters`: the projection's active-set size and iteration bound."""

    safe_data: tuple[str, ...] = ()
    flagged: tuple[str, ...] = ()
    flagged_file: Optional[str] = None
    anchors: int = 256
    pca_directions: int = 64
    random_directions: int = 64
    max_states: int = 20000
    heldout_fraction: float = 0.2
    fp_target: float = 0.02
    flag_cap: Optional[float] = None
    flag_quantile: float = 0.05
    flag_margin: float = 4.0
    working_set: int = 16
    max_iters: int = 32
    seed: int = 0

    def __post_init__(self):
        s = "safety"
        _positive(self, "anchors", "max_states", "working_set", "max_iters", section=s)
        _require(self.pca_directions >= 0 and self.random_directions >= 0
                 and self.pca_directions + self.random_directions > 0,
                 f"{s}.pca_directions", "pca_directions + random_directions must be > 0 "
                 "(and neither negative)")
        _require(0.0 < self.heldout_fraction < 1.0, f"{s}.heldout_fraction",
                 f"must lie in (0, 1), got {self.heldout_fraction}")
        _require(0.0 <= self.fp_target < 1.0, f"{s}.fp_target",
                 f"must lie in [0, 1), got {self.fp_target}")
        _require(0.0 <= self.flag_quantile <= 1.0, f"{s}.flag_quantile",
                 f"must lie in [0, 1], got {self.flag_quantile}")
        _require(self.flag_margin >= 0, f"{s}.flag_margin",
                 f"must be >= 0, got {self.flag_margin}")
        _require(all(isinstance(f, str) and f for f in self.flagged), f"{s}.flagged",
                 "every flagged string must be non-empty text")
        _seed(self.seed, f"{s}.seed")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation: AdamW with linear warmup and cosine decay."""

    steps: int = 200
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10
    seed: int = 0

    def __post_init__(self):
        s = "train"
        _positive(self, "steps", "batch_size", "learning_rate", "grad_accum",
                  "eval_every", "eval_batches", "log_every", section=s)
        _seed(self.seed, f"{s}.seed")
        _require(0 <= self.warmup_steps <= self.steps, f"{s}.warmup_steps",
                 f"must lie in [0, steps={self.steps}], got {self.warmup_steps}")
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"{s}.min_lr_ratio", "must lie in [0, 1]")
        _require(self.weight_decay >= 0, f"{s}.weight_decay", "must be >= 0")
        _require(self.grad_clip >= 0, f"{s}.grad_clip", "must be >= 0 (0 = off)")
        _require(self.batch_size % self.grad_accum == 0, f"{s}.batch_size",
                 f"{self.batch_size} is not divisible by grad_accum={self.grad_accum}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; -1 on one axis means 'all remaining devices'."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = dataclasses.asdict(self)
        for name, value in sizes.items():
            _require(value == -1 or value > 0, f"mesh.{name}",
                     f"must be a positive size or -1, got {value}")
        _require(sum(v == -1 for v in sizes.values()) <= 1, "mesh",
                 "at most one axis may be -1")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing cadence and retention."""

    every: int = 100
    keep: int = 2
    async_save: bool = True

    def __post_init__(self):
        _positive(self, "every", "keep", section="checkpoint")


@dataclasses.dataclass(frozen=True)
class PerspectiveConfig:
    """The whole run: every section of a YAML file maps to one field here."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    ternary: TernaryConfig = dataclasses.field(default_factory=TernaryConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    safety: SafetyConfig = dataclasses.field(default_factory=SafetyConfig)
    name: str = "perspective"
