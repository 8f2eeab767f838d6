"""The safety polytope of a model directory (SPEC §3.9), for inference.

    poly = load_model_polytope(model_dir, manifest)   # Polytope, or None without one

The file the manifest's "safety" entry names is checked against the manifest's
sha256 for it (`modeldir.manifest.verified_path`), then read (`safety.polytope_file`,
its own checksum and format version) and checked to fit the model (width, vocabulary):
each failure is a one-line error naming the file.
"""

from __future__ import annotations

from typing import Optional

from perspective_jax.modeldir import format as md
from perspective_jax.modeldir.manifest import verified_path
from perspective_jax.safety.polytope import Polytope, check_fits
from perspective_jax.safety.polytope_file import read_polytope


def load_model_polytope(model_dir: str, manifest: dict) -> Optional[Polytope]:
    """The polytope `model_dir` was exported with, verified, or None when it has none."""
    entry = manifest.get(md.SAFETY_KEY)
    if entry is None:
        return None
    path = verified_path(model_dir, manifest, entry["file"])
    model = manifest["config"]["model"]
    return check_fits(read_polytope(path), int(model["d_model"]), int(model["vocab_size"]),
                      path)
