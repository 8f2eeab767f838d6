"""perspective-export: write a streaming model directory from a training run.

    perspective-export --run-dir runs/quickstart --out models/tiny [--force]
                       [--shared-bits 2 --group-size 64] [--calibration-text FILE]
                       [--embedding int8|float32] [--skip-space-check]
                       [--chat-template chatml-tools|plain|FILE.jinja] [--polytope FILE]
                       [--max-host-mb N]    # read the checkpoint piece by piece within N MB
    perspective-export --run-dir runs/quickstart/safety --out models/tiny   # + its polytope
"""

from __future__ import annotations

import warnings

from perspective_jax.cli import compile_cache
from perspective_jax.config.choices import EMBEDDING_FORMATS
from perspective_jax.cli.common import OneLineParser, cli_entry, exit_with, int_in, share
from perspective_jax.model import footprint


@cli_entry
def run(argv=None) -> int:
    p = OneLineParser(prog="perspective-export", description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True,
                   help="a stage run directory, a curriculum root (its last finished "
                        "stage is exported), or a safety run (its source run is exported "
                        "with its polytope)")
    p.add_argument("--out", required=True, help="model directory to create")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--shared-bits", type=int_in(0, 8), default=0,
                   help="quantise shared kernels to this many bits with GPTQ (0 = float32)")
    p.add_argument("--group-size", type=int_in(1), default=64, help="GPTQ group size (input rows)")
    p.add_argument("--embedding", choices=EMBEDDING_FORMATS, default=None,
                   help="tied embedding/head format: int8 with one scale per row (SPEC "
                        "§3.4; the default with --shared-bits) or float32 (the default "
                        "otherwise; exact)")
    p.add_argument("--calibration-text", help="text file for GPTQ and routing frequencies "
                   "(default: the run's validation split)")
    p.add_argument("--calibration-tokens", type=int_in(2, 2**24), default=4096)
    p.add_argument("--delta-max-share", type=share, default=0.5,
                   help="keep a neighbour delta only if it is at most this share of a "
                        "full region's bytes")
    p.add_argument("--allow-oversize", action="store_true", help=footprint.OVERRIDE_HELP)
    p.add_argument("--skip-space-check", action="store_true",
                   help="export even when the free space of --out's filesystem is below "
                        "the export's expected size (a full disk is still a clean error)")
    p.add_argument("--chat-template", metavar="NAME|FILE",
                   help="chat template written into the model directory for "
                        "perspective-serve: a built-in (chatml-tools, the default; plain) "
                        "or a Jinja file (docs/inference.md, 'Chat templates and tool calls')")
    p.add_argument("--polytope", metavar="FILE",
                   help="a safety polytope (polytope.spp of perspective-train --stage "
                        "safety) to add to the model directory (default: the polytope of a "
                        "safety run given as --run-dir, else none)")
    p.add_argument("--max-host-mb", type=int_in(1), default=None, metavar="N",
                   help="read the checkpoint piece by piece (one period at a time) and "
                        "hold at most N MB (2^20 bytes) of arrays; refused up front, with "
                        "the smallest N that fits, when the largest piece does not "
                        "(default: restore the whole model; the files are the same)")
    compile_cache.add_flag(p)
    a = p.parse_args(argv)
    compile_cache.enable(a.compilation_cache)
    from perspective_jax.export.exporter import (default_embedding, export_model, resolve_run,
                                                  stream_needs)
    from perspective_jax.export.stream import ExportOptions
    from perspective_jax.modeldir.chat_template import resolve_chat_template
    resolve_chat_template(a.chat_template)    # a bad template: one line before any work
    from perspective_jax.rundir.layout import load_run_config
    from perspective_jax.rundir.lock import hold_output_dir, hold_run_dir
    # a trainer writing --run-dir, or another export into --out, is refused in one line
    with hold_run_dir(a.run_dir, shared=True), hold_output_dir(a.out):
        run_cfg = load_run_config(resolve_run(a.run_dir, log=lambda *_: None))
        if a.max_host_mb is None:
            need = footprint.export_need(run_cfg, a.shared_bits, a.calibration_tokens)
        else:                                 # its chunks are checked by export_model
            need = stream_needs(run_cfg, ExportOptions(a.shared_bits, a.group_size,
                                                       a.delta_max_share, default_embedding(
                                                           a.embedding, a.shared_bits)),
                                a.calibration_tokens)
        footprint.refuse_oversize(need, footprint.probe_machine(), a.allow_oversize)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Sharding info not provided.*")
            export_model(a.run_dir, a.out, force=a.force, shared_bits=a.shared_bits,
                         group_size=a.group_size, calibration_text=a.calibration_text,
                         calibration_tokens_n=a.calibration_tokens,
                         delta_max_share=a.delta_max_share, embedding=a.embedding,
                         space_check=not a.skip_space_check,
                         chat_template=a.chat_template, polytope=a.polytope,
                         max_host_mb=a.max_host_mb)
    return 0


main = exit_with(run)
