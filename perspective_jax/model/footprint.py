"""Memory a command needs, what this machine has, and the refusal before any work.

    check_dimensions(cfg)                       # pure arithmetic, before any JAX call
    need = train_need(cfg, "dense", machine)    # Needs: host (and device) parts in bytes
    refuse_oversize(need, machine, allow=False) # one-line UserError with the numbers

Sizes come from the census (`jax.eval_shape` of the real model: nothing is
allocated). Training holds parameters, gradients, AdamW's two moments
(`train.step.make_optimizer`), a teacher copy when the stage distils, activations
and logits; export holds the parameters, a ternarised copy of the experts and the
serialised shared tensors (streamed, --max-host-mb: one period at a time); inference
holds what the streaming engine keeps.

The activation term is deliberately rough but not optimistic: per token and layer
it counts every float32 intermediate a layer makes (projections, PDR chunk states,
attention scores and probabilities, SwiGLU hiddens, routed dispatch copies), kept
for the backward pass of every layer (one per period under `model.remat=full`),
with a margin for XLA's temporaries (`XLA_SLACK`); `tests/model/test_footprint.py` checks
it against XLA's own memory analysis of the compiled train step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Optional

from perspective_jax.config import ModelConfig, MoEConfig, PerspectiveConfig
from perspective_jax.errors import UserError

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
F32 = 4
XLA_SLACK = 1.5             # XLA temporaries and copies on top of the counted activations
LOGIT_COPIES = 6            # logits, log-softmax, its gradient and XLA's copies (float32)
TEACHER_LOGIT_COPIES = 4    # the teacher's logits, its log-softmax and the KL terms
DIM_LIMIT = 2 ** 31 - 1     # JAX indexes with 32-bit integers: no axis may be longer
ELEMENT_LIMIT = 2 ** 63 - 1  # XLA counts a tensor's elements in 64 bits
OVERRIDE = "--allow-oversize"
OVERRIDE_HELP = ("run even when the memory this needs (estimated from the config before "
                 "any work) exceeds what this machine has available")
MODEL_KNOBS = "model.d_model, model.n_layers, model.d_ff, model.vocab_size or moe.num_experts"
BATCH_KNOBS = ("train.batch_size, data.seq_len, model.n_layers or model.d_model (or raise "
               "train.grad_accum, or set model.remat=full)")


@dataclasses.dataclass(frozen=True)
class Machine:
    """Memory available now: host RAM and, on an accelerator, one device's free bytes."""
    host_bytes: Optional[int]
    device_bytes: Optional[int] = None
    platform: str = "cpu"
    n_devices: int = 1


@dataclasses.dataclass(frozen=True)
class Need:
    """Bytes one command needs in one kind of memory, by part."""
    what: str                              # e.g. "perspective-train --stage dense"
    memory: str                            # "host" or "device"
    parts: tuple[tuple[str, int], ...]
    hints: tuple[tuple[str, str], ...] = ()  # (part, what to lower when it dominates)

    @property
    def total(self) -> int:
        return sum(n for _, n in self.parts)

    def hint(self) -> str:
        largest = max(self.parts, key=lambda p: p[1])[0]
        return dict(self.hints).get(largest, "use a machine with more memory")


# ------------------------------------------------------------------ the machine
def host_available() -> Optional[int]:
    """MemAvailable (/proc/meminfo), capped by a cgroup memory limit; else sysconf."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None
    try:                                                     # cgroup v2
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        with open("/sys/fs/cgroup/memory.current") as fh:
            used = int(fh.read().strip())
        if limit != "max":
            avail = min(avail, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return avail


def probe_machine() -> Machine:
    """This machine's free memory: host RAM, and one accelerator's free bytes when JAX
    runs on one (the backend every command initialises next anyway)."""
    import jax
    host = host_available()
    devices = jax.local_devices()
    platform = devices[0].platform
    if platform == "cpu":
        return Machine(host, None, "cpu", len(devices))
    free = None
    try:
        stats = devices[0].memory_stats() or {}
        if "bytes_limit" in stats:
            free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    except Exception:  # noqa: BLE001 — a backend without memory statistics
        free = None
    return Machine(host, free, platform, len(devices))


# ------------------------------------------------------------ size absurdities
def check_dimensions(cfg: PerspectiveConfig, batch: Optional[int] = None) -> None:
    """Refuse sizes no JAX program can index, by arithmetic alone (before any JAX call):
    an axis longer than 2^31 − 1, or a tensor of more than 2^63 − 1 elements."""
    m, batch = cfg.model, cfg.train.batch_size if batch is None else batch
    micro = max(batch // cfg.train.grad_accum, 1)
    axes = {"model.vocab_size": m.vocab_size, "model.d_model": m.d_model,
            "model.d_ff": m.d_ff, "model.n_layers": m.n_layers,
            "model.n_heads × model.head_dim": m.n_heads * m.head_dim,
            "model.pdr_rank": m.pdr_rank, "model.window": m.window,
            "moe.num_experts": cfg.moe.num_experts, "data.seq_len": cfg.data.seq_len,
            "train.batch_size × data.seq_len": micro * cfg.data.seq_len}
    for name, n in axes.items():
        if n > DIM_LIMIT:
            raise UserError(f"{name} = {n} exceeds {DIM_LIMIT} (2^31 − 1), the longest axis "
                            f"JAX can index; lower it")
    tensors = {"the embedding (vocab × d_model)": m.vocab_size * m.d_model,
               "the experts (periods × experts × d_model × d_ff)":
                   m.n_periods * cfg.moe.num_experts * m.d_model * m.d_ff,
               "the PDR projection (periods × d_model²)": m.n_periods * m.d_model ** 2,
               "the logits (batch × seq_len × vocab)": micro * cfg.data.seq_len * m.vocab_size}
    for name, n in tensors.items():
        if n > ELEMENT_LIMIT:
            raise UserError(f"{name} would hold {n:.3g} elements, more than XLA can count "
                            f"({ELEMENT_LIMIT:.3g}); lower {MODEL_KNOBS}")


# ---------------------------------------------------------------- the model
@functools.lru_cache(maxsize=16)
def param_counts(model: ModelConfig, moe: MoEConfig) -> tuple[int, int, int]:
    """(total parameters, routed-expert parameters, shared matrices per period) from the
    census of the model's abstract parameter tree."""
    import jax                                   # here: the checks above need no JAX
    from perspective_jax.model import census
    from perspective_jax.model.transformer import abstract_params
    info = census.summary(model, moe)
    leaves = jax.tree_util.tree_leaves_with_path(abstract_params(model, moe))
    matrices = sum(1 for path, leaf in leaves if leaf.ndim >= 3 and not (
        model.routed and leaf.ndim >= 4 and "ffn" in jax.tree_util.keystr(path)))
    return info["total_params"], info["expert_params"], matrices


def layer_activation_bytes(m: ModelConfig, moe: MoEConfig, tokens: int, dispatch: str) -> dict:
    """Float32 intermediates of one period (its layers) for `tokens` tokens, by layer kind."""
    d, f, r, c = m.d_model, m.d_ff, m.pdr_rank, m.pdr_chunk
    common = 5 * d                                            # residual, norms, mixer/FFN out
    pdr = 6 * d + 2 * r + -(-d * r // c) + 2 * c              # p, decay, k, q, v, y; states
    q, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    gqa = 3 * (q + kv) + 2 * m.n_heads * (m.window + min(m.window, tokens))   # + scores, probs
    ffn = 3 * f + d
    out = {"pdr": 0, "gqa": 0}
    for kind in m.layer_pattern:
        per_token = common + (pdr if kind == "pdr" else gqa) + ffn
        extra = 0
        if kind == "pdr" and m.routed:
            per_token += 2 * d + moe.num_experts + 8            # sorted copies, router
            if dispatch == "blocked":
                b = max(1, min(moe.dispatch_block, tokens))
                blocks = -(-(tokens + moe.num_experts * (b - 1)) // b)
                extra = blocks * b * (2 * d + 3 * f) * F32 \
                    + blocks * 3 * d * f * ITEMSIZE[m.param_dtype]   # gathered weights
        out[kind] += per_token * tokens * F32 + extra
    return out


def _period_bytes(m, moe, tokens, dispatch) -> int:
    return sum(layer_activation_bytes(m, moe, tokens, dispatch).values())


def activation_bytes(m: ModelConfig, moe: MoEConfig, tokens: int, dispatch: str) -> int:
    """Activations a training micro-batch keeps for its backward pass (module docstring)."""
    period = _period_bytes(m, moe, tokens, dispatch)
    if m.remat == "full":                 # period inputs, one period recomputed at a time
        kept = m.n_periods * tokens * m.d_model * F32 + 2 * period
    else:                                 # none, dots: every period's intermediates
        kept = (m.n_periods + 1) * period
    return int(XLA_SLACK * kept)


# ------------------------------------------------------------------ the needs
def _shards(cfg: PerspectiveConfig, n_devices: int) -> tuple[int, int]:
    """(parameter shards, batch shards) of the mesh; (1, 1) where it does not resolve
    (the trainer says why when it builds the mesh)."""
    sizes = dataclasses.asdict(cfg.mesh)
    fixed = math.prod(v for v in sizes.values() if v != -1)
    for k, v in sizes.items():
        if v == -1:
            sizes[k] = n_devices // fixed if n_devices % fixed == 0 else 1
    if math.prod(sizes.values()) != n_devices:
        return 1, 1
    return sizes["fsdp"] * sizes["tensor"], sizes["data"] * sizes["fsdp"] * sizes["expert"]


def train_need(cfg: PerspectiveConfig, stage: str, machine: Machine) -> list[Need]:
    """What one training stage needs (`cfg` as `train.stages.stage_config` makes it):
    per device on an accelerator, the host total on the CPU backend."""
    check_dimensions(cfg)
    m = cfg.model
    pb = ITEMSIZE[m.param_dtype]
    total, experts, _ = param_counts(m, cfg.moe)
    params = total * pb
    micro = max(cfg.train.batch_size // cfg.train.grad_accum, 1)
    dispatch = cfg.moe.dispatch if cfg.moe.dispatch != "auto" else (
        "blocked" if machine.platform == "cpu" else "ragged")
    p_shards, b_shards = _shards(cfg, machine.n_devices)
    tokens = -(-micro // b_shards) * cfg.data.seq_len
    teacher = cfg.ternary.enabled and cfg.ternary.kd_weight > 0
    grads = 0 if stage == "upcycle" else params * (2 if cfg.train.grad_accum > 1 else 1)
    state = [("params", params), ("gradients", grads),   # + the accumulator with grad_accum
             ("optimizer state", 2 * params)]            # AdamW: first and second moments
    if teacher:
        state.append(("teacher", params))
    if cfg.ternary.enabled:
        state.append(("ternarised experts", experts * pb))
    state = [(k, -(-v // p_shards)) for k, v in state]
    copies = LOGIT_COPIES + (TEACHER_LOGIT_COPIES if teacher else 0)
    activations = activation_bytes(m, cfg.moe, tokens, dispatch) + int(
        teacher * XLA_SLACK * _period_bytes(m, cfg.moe, tokens, dispatch))  # teacher forward
    step = [("activations", activations), ("logits", tokens * m.vocab_size * F32 * copies)]
    if stage == "upcycle":                               # dense source + routed init copy
        dense = param_counts(dataclasses.replace(m, routed=False), cfg.moe)[0] * pb
        step = [("dense source", dense), ("routed init", params)]
    hints = tuple((k, f"lower {MODEL_KNOBS}") for k in (
        "params", "gradients", "optimizer state", "teacher", "ternarised experts",
        "dense source", "routed init", "checkpoint copy")) + (
        ("activations", f"lower {BATCH_KNOBS}"),
        ("logits", "lower model.vocab_size, train.batch_size or data.seq_len (or raise "
                   "train.grad_accum)"))
    what = f"perspective-train --stage {stage}"
    staging = ("checkpoint copy", sum(v for k, v in state if k in (
        "params", "optimizer state", "teacher")) * p_shards)
    if machine.platform == "cpu":                       # every CPU device is host memory
        if machine.n_devices > 1:
            what += f" on {machine.n_devices} CPU devices"
        per_device = [(k, v * machine.n_devices) for k, v in state + step]
        return [Need(what, "host", tuple(per_device + [staging]), hints)]
    return [Need(what, "device", tuple(state + step), hints),
            Need(what, "host", (staging,), hints)]


def export_need(cfg: PerspectiveConfig, shared_bits: int = 0, calibration_tokens: int = 4096,
                streamed: bool = False, embedding: str = "float32", chunks: tuple = (0, 0),
                inputs: Optional[tuple] = None, kernels: Optional[tuple] = None) -> list[Need]:
    """What `perspective-export` holds. Whole (the default): the restored parameters, a
    float32 ternarised copy of the experts, the serialised shared tensors, GPTQ
    Hessians, one calibration pass. `streamed` (--max-host-mb): each of its two
    heaviest moments instead, a Need of its own (`export_stream_parts`)."""
    check_dimensions(cfg, batch=1)
    if streamed:
        return [Need(f"perspective-export: {what}", "host", tuple(parts))
                for what, parts in export_stream_parts(cfg, shared_bits, calibration_tokens,
                                                       embedding, chunks, inputs, kernels)]
    m = cfg.model
    total, experts, matrices = param_counts(m, cfg.moe)
    pb = ITEMSIZE[m.param_dtype]
    widest = max(m.d_model, m.d_ff, m.n_heads * m.head_dim)
    tokens = min(calibration_tokens, 512)
    parts = [("params", total * pb), ("ternarised experts", experts * F32),
             ("serialised shared tensors", (total - experts) * pb),
             ("calibration pass", activation_bytes(
                 dataclasses.replace(m, remat="full"), cfg.moe, tokens, "blocked")
              + tokens * m.vocab_size * F32)]
    if shared_bits:
        parts.append(("GPTQ Hessians", matrices * m.n_periods * widest ** 2 * 8))
    return [Need("perspective-export", "host", tuple(parts))]


def export_stream_parts(cfg: PerspectiveConfig, shared_bits: int, calibration_tokens: int,
                        embedding: str = "float32", chunks: tuple = (0, 0),
                        inputs: Optional[tuple] = None,
                        kernels: Optional[tuple] = None) -> list[tuple[str, list]]:
    """[(moment, [(part, bytes)])] of a streamed export (`export.stream`), T the
    calibration tokens:

    the leaves outside the periods: as read, the embedding's int8 codes and
      dequantised table, the calibration inputs [T, d] (GPTQ pass, routing chunks);
    one period: its parameters (float32: the experts become their exact ternary
      values, + one matrix while one is replaced), one expert layer's trits and
      packed regions, the forward of the widest layer (XLA_SLACK) over T tokens (512
      without GPTQ); with GPTQ the period's kernel inputs [T, in] (float32, one in
      float64), Hessians [in, in] (float64, one per distinct input) and the GPTQ
      working set of the largest kernel (five [in, out] and three [in, in] float64).
    `chunks` (outside, periods): the largest stored checkpoint chunk each moment
    reads, counted three times (compressed, decoded, the piece cut out of it).
    `inputs` (distinct kernel-input widths) and `kernels` ((in, out) per kernel) of
    one period, when given, replace a bound from the widest dimension."""
    m, moe = cfg.model, cfg.moe
    pb = ITEMSIZE[m.param_dtype]
    stacked, outside = param_split(m, moe)
    v, d, f = m.vocab_size, m.d_model, m.d_ff
    tokens = max(2, calibration_tokens)
    x = tokens * d * F32 * (2 if shared_bits else 1)
    first = [("leaves outside the periods", outside * pb), ("calibration inputs", x),
             ("checkpoint chunk", 3 * chunks[0])]
    if embedding == "int8":
        first.insert(1, ("int8 embedding and its dequantised table", v * d * (1 + F32) + v * F32))
    period = [("period weights", stacked // m.n_periods * F32)]
    if m.routed:
        e = moe.num_experts
        period += [("one expert matrix (exact ternary)", e * d * f * F32),
                   ("one expert layer's trits and regions", 3 * e * d * f + e * (
                       -(-3 * d * f // 4) + 4096))]
    pass_tokens = tokens if shared_bits else min(tokens, 512)
    acts = layer_activation_bytes(m, moe, pass_tokens, "blocked")
    per_layer = max(acts[k] // max(1, m.layer_pattern.count(k)) for k in acts)
    period += [("calibration forward", int(XLA_SLACK * per_layer) + x)]
    if shared_bits:
        widest = max(d, f, m.n_heads * m.head_dim)
        n = param_counts(m, moe)[2]
        inputs = inputs if inputs is not None else (widest,) * n
        kernels = kernels if kernels is not None else ((widest, widest),) * n
        period += [("kernel inputs", tokens * (sum(inputs) * F32 + max(inputs) * 8)),
                   ("GPTQ Hessians (one period)", sum(w * w for w in inputs) * 8),
                   ("GPTQ working set", max(8 * (5 * i * o + 3 * i * i) for i, o in kernels))]
    period.append(("checkpoint chunk", 3 * chunks[1]))
    return [("the leaves outside the periods", first), ("one period", period)]


@functools.lru_cache(maxsize=16)
def param_split(model: ModelConfig, moe: MoEConfig) -> tuple[int, int]:
    """(parameters stacked over periods, parameters outside them) of the model."""
    import jax
    from perspective_jax.model.transformer import abstract_params
    params = abstract_params(model, moe)
    stacked = sum(math.prod(a.shape) for a in jax.tree.leaves(params["periods"]))
    return stacked, sum(math.prod(a.shape) for a in jax.tree.leaves(params)) - stacked


def infer_need(cfg: PerspectiveConfig, machine: Machine, shared_file_bytes: int,
               region_bytes: int, host_budget_mb: float, device_slots: int = 2,
               prefill_chunk: int = 256) -> list[Need]:
    """What the streaming engine holds: the shared weights (read, then uploaded: twice
    on the CPU backend), the host expert cache (its budget, at most every region), the
    device slots, one decode state and the largest call's float32 workspace."""
    check_dimensions(cfg, batch=1)
    m = cfg.model
    n_regions = m.n_pdr_layers * cfg.moe.num_experts if m.routed else 0
    cache = int(min(max(host_budget_mb, 0.0) * 2 ** 20, n_regions * region_bytes))
    state = m.n_pdr_layers * m.d_model * m.pdr_rank * F32 + m.n_gqa_layers * 2 * (
        m.window * m.n_kv_heads * m.head_dim * F32)
    workspace = prefill_chunk * (3 * m.d_model + 3 * m.d_ff + m.vocab_size) * F32 * 2
    device = [("shared weights", shared_file_bytes),
              ("expert slots", device_slots * region_bytes if m.routed else 0),
              ("decode state", state), ("workspace", workspace)]
    host = [("host expert cache", cache), ("shared weights read", shared_file_bytes)]
    hints = (("host expert cache", "lower --host-budget-mb"),)
    if machine.platform == "cpu":
        return [Need("perspective-infer", "host", tuple(host + device), hints)]
    return [Need("perspective-infer", "device", tuple(device), hints),
            Need("perspective-infer", "host", tuple(host), hints)]


# ------------------------------------------------------------------ the check
def describe(need: Need, available: Optional[int]) -> str:
    """The one-line refusal: total, the parts, what is available, what to do."""
    from perspective_jax.model import census
    parts = ", ".join(f"{k} {census.human_bytes(v)}" for k, v in need.parts if v)
    where = "one device's" if need.memory == "device" else "host"
    have = (f"this machine has {census.human_bytes(available)} of {need.memory} memory "
            "available")
    return (f"{need.what} needs ~{census.human_bytes(need.total)} of {where} memory "
            f"({parts}); {have}; {need.hint()}, or pass {OVERRIDE}")


def refuse_oversize(needs: list[Need], machine: Machine, allow: bool = False) -> None:
    """UserError for the first need over what the machine has (unless `allow`)."""
    for need in needs:
        available = machine.host_bytes if need.memory == "host" else machine.device_bytes
        if available is not None and need.total > available and not allow:
            raise UserError(describe(need, available))


def refuse_oversize_engine(manifest, host_budget_mb: float, device_slots: int,
                           prefill_chunk: int, allow: bool) -> None:
    """`refuse_oversize` for a streaming engine on the model directory of `manifest`
    (a `modeldir.manifest.Manifest`): what perspective-infer / -serve / -adapt check
    before loading anything."""
    machine = probe_machine()
    refuse_oversize(infer_need(
        manifest.config, machine, manifest["files"][manifest["shared"]["file"]]["bytes"],
        manifest["experts"].get("region_bytes", 0), host_budget_mb, device_slots,
        prefill_chunk), machine, allow)
