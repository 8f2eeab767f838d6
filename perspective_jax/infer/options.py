"""The streaming engine's options, one frozen value checked when it is made.

    engine = StreamingEngine(model_dir, EngineOptions(host_budget_mb=512, device_slots=4))

Budgets: `host_budget_mb` (host tier, read buffers in flight included) and
`device_budget_mb` (shared weights + `device_slots` regions + decode state + the
largest call's temporaries; None = unchecked) are hard limits. `io`: "mmap" or
"direct" (O_DIRECT, bypasses the page cache). `predictor`: how layer j+1's expert
(and, with learned heads, the next token's layer-0 expert) is guessed
(PREDICTORS, `infer.predictor`). `prefill_chunk`: tokens per prefill call.
`host_memory_kind`: memory of the host tier — "pinned_host" on an accelerator,
plain numpy on the CPU backend by default. `pin_before_transfer`: pin a fresh read
into the host tier before sending it to the device (the old order; default is to
send it from the read buffer and pin it afterwards on the admit thread).
`cancel_wrong_reads`: stop a wrong guess still reading when its layer arrives
(off by default: slower on the 2-core CPU, docs/benchmarks.md). `transfer_thread`:
read regions on one thread and copy them to the device on another, so the disk can
read the next region during a host→device copy (None, the default: on where the
device is not the CPU — on an H200 it took streamed decode from disk from 60 % to
89 % of the I/O bound; on the CPU backend a copy is free and the thread only costs).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from perspective_jax.config.choices import IO_MODES, PREDICTORS
from perspective_jax.errors import UserError

HOST_MEMORY_KINDS = ("numpy", "pinned_host", "unpinned_host", "device")


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    host_budget_mb: float = 1024
    device_budget_mb: Optional[float] = None
    device_slots: int = 2
    prefetch: bool = True
    use_deltas: bool = True
    pin_hubs: bool = True          # hold each expert layer's hub in the host cache
    warm_start: bool = True
    io: str = "mmap"
    predictor: str = "auto"
    prefill_chunk: int = 256
    host_memory_kind: Optional[str] = None
    pin_before_transfer: bool = False
    cancel_wrong_reads: bool = False
    transfer_thread: Optional[bool] = None

    def __post_init__(self):
        if self.predictor not in PREDICTORS:
            raise UserError(f"unknown prefetch predictor {self.predictor!r}; use one of "
                            f"{PREDICTORS}")
        if self.device_slots < 2:
            raise UserError(f"--device-slots {self.device_slots}: the device tier needs at "
                            "least 2 slots (the double buffer)")
        if self.prefill_chunk < 1:
            raise UserError(f"--prefill-chunk {self.prefill_chunk}: must be >= 1")
        if self.io not in IO_MODES:
            raise UserError(f"--io {self.io!r}: use one of {IO_MODES}")
        if self.host_memory_kind not in (None, *HOST_MEMORY_KINDS):
            raise UserError(f"host memory kind {self.host_memory_kind!r}: use one of "
                            f"{HOST_MEMORY_KINDS}")
