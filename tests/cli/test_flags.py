"""Numeric flags of every CLI: a value outside its range is one line naming the flag
and the range, exit 2, before any work (today's tracebacks: 1e308 megabytes)."""

import pytest

from perspective_jax.cli import budget, export, infer, info

INFER = ["--model-dir", "no-such-model", "hi"]
EXPORT = ["--run-dir", "no-such-run", "--out", "no-such-out"]


@pytest.mark.parametrize("run, argv, message", [
    (budget.run, ["--device-reserve-mb", "1e308"], "--device-reserve-mb: must lie in [0, 10"),
    (budget.run, ["--workspace-factor", "1e308"], "--workspace-factor: must lie in [0, 1000]"),
    (budget.run, ["--host-cache-mb", "-1"], "--host-cache-mb: must lie in [0, 1073741824]"),
    (budget.run, ["--region-align", "0"], "--region-align: must lie in [1, 1073741824], got 0"),
    (infer.run, INFER + ["--host-budget-mb", "1e308"], "--host-budget-mb: must lie in [0, "),
    (infer.run, INFER + ["--host-budget-mb", "-5"], "--host-budget-mb: must lie in [0, "),
    (infer.run, INFER + ["--device-budget-mb", "1e308"], "--device-budget-mb: must lie in"),
    (infer.run, INFER + ["--temperature", "1e308"], "--temperature: must lie in [0, 100]"),
    (infer.run, INFER + ["--temperature", "-1"], "--temperature: must lie in [0, 100]"),
    (infer.run, INFER + ["--top-k", "-1"], "--top-k: must lie in [0, 2147483647], got -1"),
    (infer.run, INFER + ["--top-p", "0"], "--top-p: must lie in (0, 1], got 0"),
    (infer.run, INFER + ["--max-tokens", "0"], "--max-tokens: must lie in [1, 2147483647]"),
    (infer.run, INFER + ["--max-tokens", "1e3"], "--max-tokens: '1e3' is not an integer"),
    (infer.run, INFER + ["--prefill-chunk", "0"], "--prefill-chunk: must lie in [1, "),
    (infer.run, INFER + ["--device-slots", "99999999999"], "--device-slots: must lie in [2, "),
    (export.run, EXPORT + ["--shared-bits", "99"], "--shared-bits: must lie in [0, 8]"),
    (export.run, EXPORT + ["--calibration-tokens", "1e12"], "'1e12' is not an integer"),
    (info.run, ["--seq-len", "0"], "--seq-len: must lie in [1, 1048576], got 0"),
])
def test_numeric_flags_out_of_range_are_one_line_errors(capsys, run, argv, message):
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_full_disk_anywhere_is_one_line(capsys):
    """An OSError of a full disk that no caller named is still one line naming the path."""
    import errno

    from perspective_jax.cli.common import cli_entry

    @cli_entry
    def fails(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/some/run/metrics.jsonl")

    assert fails([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no space left on the device writing "
                                               "/some/run/metrics.jsonl")
