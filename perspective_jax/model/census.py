"""Parameter census from `jax.eval_shape` of the real model (SPEC §2).

Nothing is allocated: the 1.05T preset is counted from abstract shapes.
Components follow SPEC §2: PDR mixers, GQA mixers, the shared FFNs after GQA
layers, the FFNs after PDR layers (the routed-expert slots; dense until the
`upcycle` stage), the tied embedding and the norms.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from perspective_jax.config import ModelConfig, MoEConfig
from perspective_jax.model.routed_ffn import NEXT_TOKEN_PREDICTOR, PREDICTOR
from perspective_jax.model.transformer import abstract_params

DENSE_SLOT = "FFN after PDR (dense slot)"
EXPERTS = "routed experts (after PDR)"
ROUTER = "torus router"
HEADS = "expert-predictor heads"      # per routed layer + the next-token head
# Bits per weight of each storage format reported by the census.
FORMAT_BITS = {"float32": 32.0, "bfloat16": 16.0, "2-bit": 2.0, "ternary": 8.0 / 5.0}


@dataclasses.dataclass(frozen=True)
class Component:
    name: str
    count: int          # how many layers hold one
    params: int         # total over all of them
    shared: bool        # False for the routed-expert slots

    @property
    def per_layer(self) -> int:
        return self.params // max(self.count, 1)


def _size(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def census(cfg: ModelConfig, moe: MoEConfig = MoEConfig()) -> list[Component]:
    """Parameters per SPEC component, from the model's abstract parameter tree."""
    params = abstract_params(cfg, moe)
    groups: dict[str, int] = {}

    def add(key, n):
        groups[key] = groups.get(key, 0) + n

    add("embedding (tied head)", _size(params["embed"]))
    add("norms", _size(params["final_norm"]))
    for i, kind in enumerate(cfg.layer_pattern):
        layer = params["periods"][f"layer_{i}"]
        add(f"{kind.upper()} mixer", _size(layer["mixer"]))
        add("norms", _size(layer["mixer_norm"]) + _size(layer["ffn_norm"]))
        if kind == "pdr" and cfg.routed:
            ffn = dict(layer["ffn"])
            add(ROUTER, _size(ffn.pop("router")))
            add(HEADS, _size(ffn.pop(PREDICTOR, {})))
            add(EXPERTS, _size(ffn))
        elif kind == "pdr":
            add(DENSE_SLOT, _size(layer["ffn"]))
        else:
            add("shared FFN (after GQA)", _size(layer["ffn"]))
    if NEXT_TOKEN_PREDICTOR in params:
        add(HEADS, _size(params[NEXT_TOKEN_PREDICTOR]))
    counts = {HEADS: cfg.n_pdr_layers + 1, "PDR mixer": cfg.n_pdr_layers, "GQA mixer": cfg.n_gqa_layers,
              "shared FFN (after GQA)": cfg.n_gqa_layers, DENSE_SLOT: cfg.n_pdr_layers,
              EXPERTS: cfg.n_pdr_layers, ROUTER: cfg.n_pdr_layers,
              "embedding (tied head)": 1, "norms": 2 * cfg.n_layers + 1}
    return [Component(name, counts[name], n, name not in (DENSE_SLOT, EXPERTS))
            for name, n in groups.items()]


def summary(cfg: ModelConfig, moe: MoEConfig = MoEConfig()) -> dict:
    """Machine-readable census: components, shared/expert/total/active params, bytes."""
    comps = census(cfg, moe)
    shared = sum(c.params for c in comps if c.shared)
    total = sum(c.params for c in comps)
    experts = sum(c.params for c in comps if c.name == EXPERTS)
    slots = sum(c.params for c in comps if c.name == DENSE_SLOT)
    return {
        "components": [dict(dataclasses.asdict(c), per_layer=c.per_layer) for c in comps],
        "shared_params": shared,
        "expert_params": experts,
        "total_params": total,
        "active_params_per_token": shared + slots + experts // (moe.num_experts if experts else 1),
        "bytes": {fmt: int(math.ceil(total * bits / 8)) for fmt, bits in FORMAT_BITS.items()},
        "format_bits": FORMAT_BITS,
    }


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_table(cfg: ModelConfig, title: str = "", moe: MoEConfig = MoEConfig()) -> str:
    info = summary(cfg, moe)
    fmts = list(FORMAT_BITS)
    head = f"{'component':30s} {'layers':>6s} {'per layer':>11s} {'params':>11s}" + "".join(
        f" {f:>10s}" for f in fmts)
    lines = [title] if title else []
    lines += [head, "-" * len(head)]

    def row(name, count, per, n):
        cells = "".join(f" {human_bytes(n * FORMAT_BITS[f] / 8):>10s}" for f in fmts)
        return f"{name:30s} {count:>6s} {per:>11s} {human(n):>11s}{cells}"

    for c in info["components"]:
        lines.append(row(c["name"], str(c["count"]), human(c["per_layer"]), c["params"]))
    lines.append("-" * len(head))
    lines.append(row("shared (all but FFNs after PDR)", "", "", info["shared_params"]))
    if info["expert_params"]:
        lines.append(row("experts", "", "", info["expert_params"]))
    lines.append(row("total", "", "", info["total_params"]))
    lines.append(row("active per token", "", "", info["active_params_per_token"]))
    return "\n".join(lines)


def _matmul_params(cfg: ModelConfig, moe: MoEConfig = MoEConfig()) -> int:
    """Weights used in matmuls per token: mixers, the FFN each token uses, the head."""
    comps = {c.name: c.params for c in census(cfg, moe)}
    used = sum(n for name, n in comps.items() if name.endswith("mixer"))
    used += comps.get("shared FFN (after GQA)", 0) + comps.get(DENSE_SLOT, 0)
    used += comps.get(EXPERTS, 0) // moe.num_experts
    return used + cfg.vocab_size * cfg.d_model


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one forward pass per token (2 per multiply-add).

    Counts the projections and head (2·N), the PDR chunk work (pairwise scores
    and decayed sums within a chunk, S·q, the state update) and windowed
    attention over the keys a query actually sees (mean of min(t+1, W)).
    """
    d, r, c = cfg.d_model, cfg.pdr_rank, cfg.pdr_chunk
    pdr = 2 * (c * r + c * d) + 4 * d * r
    keys = sum(min(t + 1, cfg.window) for t in range(seq_len)) / seq_len
    attn = 4 * cfg.n_heads * cfg.head_dim * keys
    return (2 * _matmul_params(cfg) + cfg.n_pdr_layers * pdr + cfg.n_gqa_layers * attn)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward ≈ 3 × forward (without rematerialisation)."""
    return 3 * forward_flops_per_token(cfg, seq_len)
