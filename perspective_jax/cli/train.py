"""`perspective-train`: run a curriculum stage (SPEC §4).

    perspective-train --stage dense --config curricula/tiny.yaml --run-dir runs/x \\
        [--data PATH [--data PATH ...]] [--init-from RUN_DIR] [--resume-from-step N]
        [section.key=value ...]
    perspective-train --stage safety --init-from runs/x/align --run-dir runs/x/safety \
        --flagged STRING [--flagged STRING ...] [--flagged-file FILE] [--safe-data PATH ...]

Several processes (hosts) train one run: start the same command on every host with
`--coordinator HOST:PORT --num-processes N --process-id I`, or under `srun` /
`mpirun` (detected); see docs/training.md. The run directory and the data must be
at the same path on every host (a shared filesystem).

Re-running the same command resumes from the run's latest complete checkpoint
(verified against its checksums); `--resume-from-step N` resumes from step N
instead and moves the later checkpoints aside. One trainer at a time per run
directory (a second is refused, naming the first's PID). Ctrl-C or SIGTERM: exit
130 — in the training loop after saving a checkpoint, before it (start-up, data
preparation, the first compile) at once; a second one quits at once.
"""

from __future__ import annotations

import os
import sys

from perspective_jax.cli import cluster, compile_cache
from perspective_jax.cli.common import (OneLineParser, add_config_args, cli_entry,
                                         exit_with, int_in)
from perspective_jax.config import load_config
from perspective_jax.config.choices import SAFETY_STAGE, STAGES
from perspective_jax.model.footprint import OVERRIDE_HELP


@cli_entry(on_signal="rerun the same command to resume from the last checkpoint")
def run(argv=None) -> int:
    parser = OneLineParser(prog="perspective-train", description=__doc__.split("\n")[0])
    parser.add_argument("--stage", required=True,
                        choices=STAGES,
                        help="curriculum stage to run")
    parser.add_argument("--run-dir", required=True, help="directory of this run "
                        "(created; resumed if it holds checkpoints)")
    parser.add_argument("--data", action="append", metavar="PATH",
                        help="a text/JSONL file, directory or glob; repeat for more "
                             "(default: the Python standard library source)")
    parser.add_argument("--init-from", metavar="RUN_DIR",
                        help="start from another run's final parameters and tokenizer")
    parser.add_argument("--resume-from-step", type=int_in(0), metavar="N",
                        help="resume from the run's complete checkpoint at step N instead "
                             "of the latest (later ones are moved to "
                             "RUN_DIR/checkpoints-set-aside/)")
    parser.add_argument("--safe-data", action="append", metavar="PATH",
                        help="--stage safety: vetted safe text (file, directory or glob; "
                             "repeat for more; default: the --init-from run's corpus)")
    parser.add_argument("--flagged", action="append", metavar="STRING",
                        help="--stage safety: a string the model must not emit (repeat "
                             "for more)")
    parser.add_argument("--flagged-file", metavar="FILE",
                        help="--stage safety: flagged strings, one per line ('#' lines "
                             "and blank lines skipped)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--allow-oversize", action="store_true", help=OVERRIDE_HELP)
    compile_cache.add_flag(parser)
    cluster.add_flags(parser)
    add_config_args(parser)
    args = parser.parse_intermixed_args(argv)  # overrides may follow flags
    spec = cluster.cluster_spec(args, os.environ)
    safety_args = {"--safe-data": args.safe_data, "--flagged": args.flagged,
                   "--flagged-file": args.flagged_file}
    given = [flag for flag, value in safety_args.items() if value]
    if given and args.stage != SAFETY_STAGE:
        parser.error(f"{given[0]} is only for --stage {SAFETY_STAGE}")
    cfg = load_config(args.config, args.overrides)
    primary = True
    if spec.multi:                  # before anything that starts a JAX backend
        from perspective_jax.train import distributed
        distributed.start(spec.init_kwargs(), spec.label)
        primary = distributed.is_primary()
    compile_cache.enable(args.compilation_cache)

    from perspective_jax.train.stages import check_memory, run_stage
    if args.stage == SAFETY_STAGE:
        from perspective_jax.train.safety_stage import with_safety_args
        cfg = with_safety_args(cfg, args.safe_data, args.flagged, args.flagged_file)

    check_memory(args.stage, cfg, allow=args.allow_oversize)   # before any heavy work
    result = run_stage(args.stage, cfg, args.run_dir, data=args.data,
                       init_from=args.init_from, resume_from_step=args.resume_from_step,
                       progress=not args.no_progress and sys.stderr.isatty(),
                       log=print if primary else _quiet)
    if result is None or not primary:       # process 0 reports for all
        return 130 if result is not None and result.stopped == "signal" else 0
    if result.stopped == "signal":
        print(f"stopped by signal at step {result.step}; checkpoint saved in "
              f"{args.run_dir} — rerun the same command to resume", file=sys.stderr)
        return 130
    head = result.note or f"step {result.step}" + (
        f", train loss {result.train_loss:.4f}" if result.train_loss is not None else "")
    print(f"stage {args.stage}: {head}"
          + (f", val loss {result.val_loss:.4f} nats/token, "
             f"{result.val_bits_per_char:.3f} bits/char" if result.val_loss is not None else "")
          + f" ({result.wall_s:.0f}s)")
    if result.routing:
        r = result.routing
        print(f"routing: gini {r['gini']:.3f}, all experts reachable: {r['all_reachable']}, "
              f"adjacent-token switches same/neighbour/other "
              f"{r['switch_same']:.2f}/{r['switch_neighbour']:.2f}/{r['switch_other']:.2f}")
        if "predictor_accuracy_layer" in r:
            print(f"expert prediction: next layer {r['predictor_accuracy_layer']:.2f}, "
                  f"next token's layer 0 {r['predictor_accuracy_token']:.2f}")
    if result.sample:
        print(f"sample: {result.sample!r}")
    return 0


def _quiet(*_args, **_kwargs) -> None:
    """The log of processes other than 0."""


def _main(argv=None) -> int:
    from perspective_jax.cli.supervisor import redirect_runtime_log
    redirect_runtime_log()          # under a supervisor: the native log to its file
    return run(argv)


main = exit_with(_main)

if __name__ == "__main__":
    main()
