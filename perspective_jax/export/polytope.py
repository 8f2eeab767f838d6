"""The safety polytope in an export: found, checked, written and listed.

    path = run_polytope(run_dir)                  # a safety run's polytope, or None
    poly = polytope_for(path, cfg)                # read and checked before heavy work
    entry = write_model_polytope(out, poly, head)  # MODEL_DIR/polytope.spp + manifest entry

`head` [V, d] is the tied head the exported model computes with (int8 or float32),
so the polytope's interior point is checked against the rows inference will use.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from perspective_jax.config import PerspectiveConfig
from perspective_jax.rundir.layout import load_safety_record
from perspective_jax.safety.polytope import FORMAT_VERSION, Polytope, check_fits
from perspective_jax.safety.polytope_file import POLYTOPE_FILE, read_polytope, write_polytope


def run_polytope(run_dir: str) -> Optional[str]:
    """The polytope file of a safety run (`train.safety_stage`), or None for any other
    run directory."""
    record = load_safety_record(run_dir)
    return None if record is None else os.path.join(run_dir, record["polytope"])


def polytope_for(path: str, cfg: PerspectiveConfig) -> Polytope:
    """The polytope in `path`, checked (file checksum, model width, vocabulary)."""
    return check_fits(read_polytope(path), cfg.model.d_model, cfg.model.vocab_size, path)


def write_model_polytope(out: str, poly: Polytope, head_table) -> dict:
    """Write `poly` as out/POLYTOPE_FILE once its interior point is inside every row
    for `head_table` [V, d]; returns the manifest's SAFETY_KEY entry."""
    poly.arrays(np.asarray(head_table, np.float32))  # refuses a polytope this head breaks
    write_polytope(os.path.join(out, POLYTOPE_FILE), poly)
    return {"file": POLYTOPE_FILE, "format_version": FORMAT_VERSION,
            "flagged": list(poly.flagged), "support_rows": int(len(poly.support_bounds)),
            "flagged_rows": int(len(poly.flag_tokens)), "eps": float(poly.eps)}
