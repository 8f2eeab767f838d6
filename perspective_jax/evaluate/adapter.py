"""What a trained adapter does for a model (`perspective-eval --adapter FILE`,
SPEC §3.8): the `adapter.*` metrics.

    check(model_dir, manifest, "shakespeare.adapter")         # one line before any work
    values = measure(engine, "shakespeare.adapter", windows)  # windows [S, T+1]

On the same windows of the held-out text (the test split's segments), with the
loss adaptation itself minimises (`adapt.target.StreamedTarget.loss`: the mean
next-token loss over every position, on the streaming engine):

* adapter.loss_base — the model as exported (no adapters, trained routers);
* adapter.loss — with the file's adapters (and its expert coordinates, if any);
* adapter.loss_gain — loss_base − loss (nats/token; > 0: the adapter helps);
* adapter.rank — the adapters' rank.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from perspective_jax.adapt.adapter_file import load_adapters
from perspective_jax.adapt.target import StreamedTarget
from perspective_jax.modeldir.manifest import model_identity


def check(manifest, path: str) -> None:
    """A one-line UserError when `path` is not an adapter file of this model."""
    load_adapters(path, model_identity(manifest), manifest.config)


def measure(engine, path: str, windows, log: Callable[[str], None] = lambda _: None
            ) -> dict:
    """The adapter.* metrics (module docstring) on `windows` [S, T+1] token ids."""
    lora, spec, coords = load_adapters(path, engine.identity, engine.cfg)
    windows = np.asarray(windows, np.int32)
    log(f"adapter: rank {spec.rank} on {', '.join(spec.targets)}"
        f"{' and expert coordinates' if coords else ''}, {windows.shape[0]} segments")
    target = StreamedTarget(engine, spec.scale)
    base = target.loss(windows, None)
    adapted = target.loss(windows, lora, coords or None)
    return {"adapter.loss_base": base, "adapter.loss": adapted,
            "adapter.loss_gain": base - adapted, "adapter.rank": float(spec.rank)}
