"""perspective-eval: loss, calibration, decode speed and memory of a streamed model,
checked against the gates you declare.

    perspective-eval --model-dir models/tiny --data held_out/ --gates gates.yaml --out report/
    perspective-eval --model-dir models/tiny --lm-eval perspective_perplexity \
        --lm-eval-include docs/examples/lm_eval

Prints every metric with PASS/FAIL for the gated ones, writes report.json,
report.md, reliability.png and risk_coverage.png to --out, and exits 1 when a gate
fails (2 on bad input). --lm-eval runs lm-evaluation-harness tasks in process on
the same model (with or without --data) and adds their metrics ("lm_eval").
"""

from __future__ import annotations

import json
import sys

from perspective_jax.cli import compile_cache
from perspective_jax.cli.common import (OneLineParser, add_adapter_flags, add_memory_flags,
                                        add_mpd_flags, cli_entry, exit_with, int_in, megabytes,
                                        mpd_from_args, recall_config_from_args)
from perspective_jax.errors import UserError


def _parser() -> OneLineParser:
    p = OneLineParser(prog="perspective-eval", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", help="directory written by perspective-export")
    p.add_argument("--data", action="append", default=[], metavar="FILE_OR_DIR",
                   help="held-out text: files, directories or globs (repeatable)")
    p.add_argument("--gates", metavar="YAML", help="gates to check (see docs/evaluation.md)")
    p.add_argument("--out", metavar="REPORT_DIR", help="write JSON, Markdown and PNGs here")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--list-metrics", action="store_true", help="list the metrics and exit")
    e = p.add_argument_group("evaluation size")
    e.add_argument("--segment-len", type=int_in(2), default=128)
    e.add_argument("--max-segments", type=int_in(2), default=32,
                   help="segments scored (half validation, half test)")
    e.add_argument("--decode-tokens", type=int_in(2), default=64,
                   help="tokens per timed generation")
    e.add_argument("--no-persistent", action="store_true",
                   help="skip scoring MPD with persistent per-perspective states")
    add_mpd_flags(p, switch=False)
    s = p.add_argument_group("safety projection (a model exported with a polytope)")
    s.add_argument("--safety", action="store_true",
                   help="measure the safety projection: spp_* metrics (docs/safety.md)")
    s.add_argument("--red-team", metavar="FILE",
                   help="prompts written to invite a flagged string (one per line, or JSON "
                        "Lines with 'prompt'), added to the contexts cut from --data")
    s.add_argument("--safety-contexts", type=int_in(1), default=48, metavar="N",
                   help="red-team and safe contexts each cut from --data (default 48)")
    add_memory_flags(p)
    p.add_argument("--memory-entries", type=int_in(1), default=64, metavar="N",
                   help="stored entries scored for memory.* (with --memory)")
    add_adapter_flags(p, use="adapter.* metrics, the test segments' loss without and "
                             "with it")
    h = p.add_argument_group("lm-evaluation-harness (pip install 'perspective-jax[eval]')")
    h.add_argument("--lm-eval", metavar="TASK[,TASK]",
                   help="harness tasks to run in process (lm_eval's, or YAML tasks under "
                   "--lm-eval-include)")
    h.add_argument("--lm-eval-include", metavar="DIR",
                   help="a directory of task YAML files, e.g. docs/examples/lm_eval")
    h.add_argument("--lm-eval-limit", type=int_in(1), metavar="N",
                   help="at most N documents per task")
    m = p.add_argument_group("engine")
    m.add_argument("--host-budget-mb", type=megabytes, default=1024)
    m.add_argument("--device-slots", type=int_in(2), default=2)
    compile_cache.add_flag(m)
    return p


@cli_entry
def run(argv=None) -> int:
    a = _parser().parse_args(argv)
    from perspective_jax.evaluate.metrics import METRICS
    if a.list_metrics:
        for m in METRICS.values():
            print(f"{m.name:36s} {m.unit or '-':11s} {m.better:7s} {m.description}")
        return 0
    if not a.model_dir or not (a.data or a.lm_eval):
        raise UserError("--model-dir and --data are required, or --model-dir and --lm-eval "
                        "TASKS (perspective-eval --model-dir M --data FILE_OR_DIR)")
    if a.gates and not a.data:
        raise UserError("--gates checks the metrics measured on --data; give --data")
    if (a.safety or a.red_team) and not a.data:
        raise UserError("--safety measures on held-out --data; give --data")
    if a.memory and not a.data:
        raise UserError("--memory measures against held-out --data; give --data")
    if a.adapter and not a.data:
        raise UserError("--adapter measures on held-out --data; give --data")
    if a.red_team and not a.safety:
        raise UserError("--red-team goes with --safety")
    if (a.lm_eval_include or a.lm_eval_limit) and not a.lm_eval:
        raise UserError("--lm-eval-include and --lm-eval-limit go with --lm-eval TASKS")
    from perspective_jax.evaluate.gates import check, load_gates
    gates = load_gates(a.gates) if a.gates else []       # bad gates fail before any work
    mpd = mpd_from_args(a)
    from perspective_jax.evaluate.report import (HARNESS_HEAD, harness_rows, metric_rows,
                                                 text_table, verdicts_json, write_report)
    from perspective_jax.evaluate.run import EvalOptions, EvalResult, evaluate_model
    from perspective_jax.evaluate.safety import SafetyEvalOptions, read_prompts
    from perspective_jax.evaluate.memory import MemoryEvalOptions
    safety = None
    if a.safety:
        safety = SafetyEvalOptions(red_team=a.safety_contexts, safe=a.safety_contexts,
                                   decode_tokens=a.decode_tokens,
                                   prompts=tuple(read_prompts(a.red_team)) if a.red_team else ())
    opts = EvalOptions(segment_len=a.segment_len, max_segments=a.max_segments,
                       decode_tokens=a.decode_tokens, mpd=mpd, persistent=not a.no_persistent,
                       host_budget_mb=a.host_budget_mb, device_slots=a.device_slots,
                       safety=safety,
                       memory=None if not a.memory else MemoryEvalOptions(
                           a.memory, recall_config_from_args(a), a.memory_entries),
                       adapter=a.adapter)
    log = (lambda msg: print(msg, file=sys.stderr))
    tasks = manager = None
    if a.lm_eval:                            # unknown tasks fail before any model work
        from perspective_jax.evaluate import harness
        tasks = harness.parse_tasks(a.lm_eval)
        manager = harness.task_manager(tasks, a.lm_eval_include)
    compile_cache.enable(a.compilation_cache)
    result = (evaluate_model(a.model_dir, a.data, opts, log) if a.data
              else EvalResult({}, {}, {}))
    lm_eval = None
    if tasks is not None:
        log(f"lm-evaluation-harness: running {', '.join(tasks)}")
        lm_eval = harness.run_tasks(a.model_dir, tasks, manager, a.lm_eval_limit,
                                    host_budget_mb=a.host_budget_mb,
                                    device_slots=a.device_slots)
    verdicts = check(gates, result.values)
    header = {"model_dir": a.model_dir, "data": a.data, "title": a.model_dir}
    if a.adapter:
        header["adapter"] = a.adapter
    if a.out:
        for path in write_report(a.out, header, result.values, verdicts, result.confidences,
                                 result.fitted, lm_eval):
            print(f"wrote {path}", file=sys.stderr)
    if a.json:
        doc = {"metrics": result.values, "gates": verdicts_json(verdicts),
               "passed": all(v.passed for v in verdicts)}
        print(json.dumps(doc if lm_eval is None else {**doc, "lm_eval": lm_eval}, indent=1))
    else:
        tables = [text_table(metric_rows(result.values, verdicts))] if a.data else []
        if lm_eval is not None:
            tables.append(text_table(harness_rows(lm_eval), HARNESS_HEAD))
        print("\n\n".join(tables))
    failed = [v for v in verdicts if not v.passed]
    if failed:
        print(f"{len(failed)} of {len(verdicts)} gates failed: "
              + "; ".join(f"{v.gate} (measured {v.value if v.value is not None else 'nothing'})"
                          for v in failed), file=sys.stderr)
        return 1
    if verdicts:
        print(f"all {len(verdicts)} gates passed", file=sys.stderr)
    return 0


main = exit_with(run)

if __name__ == "__main__":
    main()
