"""What the streaming engine keeps on the device, and the --device-budget-mb check.

    budget = DeviceBudget(shared_bytes, n_slots, region_bytes, state_bytes, workspace)
    budget.check(options.device_budget_mb)     # UserError naming every part when over

The workspace is the temporaries of the largest call the engine makes, from the
compiled executables' memory analysis on this backend (`workspace_bytes`): the
head (an int8 table widens one row block to float32) and, for a routed model, one
prefill expert call at the largest row group (on a GPU the dequantise-then-matmul
path decodes the expert's matrices to float32). The calls run one after another,
so the largest counts.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from perspective_jax.config import ModelConfig
from perspective_jax.errors import UserError
from perspective_jax.infer import compute as L

MB = 1 << 20


@dataclasses.dataclass(frozen=True)
class DeviceBudget:
    shared_bytes: int           # shared weights (embedding, mixers, norms, scales)
    n_slots: int                # expert-layer slots (0: not routed)
    region_bytes: int
    state_bytes: int            # one sequence's decode state
    workspace_bytes: int = 0    # largest call's temporaries (0: not measured)

    @property
    def needed(self) -> int:
        return (self.shared_bytes + self.n_slots * self.region_bytes + self.state_bytes
                + self.workspace_bytes)

    def message(self, budget_mb: float) -> str:
        work = (f" + workspace {self.workspace_bytes / MB:.2f} MB"
                if self.workspace_bytes else "")
        return (f"--device-budget-mb {budget_mb:g} is too small: shared weights "
                f"{self.shared_bytes / MB:.2f} MB + {self.n_slots} expert slots × "
                f"{self.region_bytes / MB:.2f} MB + decode state {self.state_bytes / MB:.2f} MB"
                f"{work} = {self.needed / MB:.2f} MB")

    def check(self, budget_mb: Optional[float]) -> None:
        if budget_mb is not None and self.needed > budget_mb * MB:
            raise UserError(self.message(budget_mb))


def temp_bytes(lowered) -> int:
    """Bytes of temporaries XLA's memory analysis reports for a lowered call."""
    stats = lowered.compile().memory_analysis()
    return int(getattr(stats, "temp_size_in_bytes", 0) or 0)


def _like(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def workspace_bytes(cfg: ModelConfig, final_norm, embed_table, prefill_chunk: int,
                    expert: Optional[tuple] = None) -> int:
    """Temporaries of the head and (`expert` = (region_bytes, expert_scales,
    activation_bits) for a routed model) one prefill expert call at the largest row
    group a chunk of `prefill_chunk` tokens can give."""
    sds, dt = jax.ShapeDtypeStruct, L.dtype_of(cfg.dtype)
    head = L.head.lower(cfg, _like(final_norm), _like(embed_table), sds((1, cfg.d_model), dt))
    worst = temp_bytes(head)
    if expert is not None:
        region_bytes, scales, activation_bits = expert
        rows = 1 << max(prefill_chunk - 1, 0).bit_length()
        args = (sds((rows, cfg.d_model), dt), sds((rows, cfg.d_model), dt),
                sds((rows,), jnp.int32), sds((region_bytes,), jnp.uint8), _like(tuple(scales)),
                sds((), jnp.int32), sds((), jnp.int32))
        worst = max(worst, temp_bytes(L.expert_rows.lower(cfg, activation_bits, *args)))
    return worst
