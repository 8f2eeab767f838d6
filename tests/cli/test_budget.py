"""perspective-budget (`perspective_jax.cli.budget`, computed by
`perspective_jax.infer.envelope`): every figure re-derived here by hand from the
config fields."""

import json
import math
import os
import subprocess
import sys

import pytest

from perspective_jax.cli import budget
from perspective_jax.config import load_config
from perspective_jax.infer.envelope import Assumptions, envelope

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FULL = os.path.join(REPO, "curricula", "perspective-1t.yaml")
TINY = os.path.join(REPO, "curricula", "tiny.yaml")
ISSUE_FLAGS = ["--device-mb", "4096", "--ram-mb", "32768", "--pcie-gbs", "7", "--disk-gbs", "6"]


def run_json(capsys, config, *extra):
    assert budget.run(["--config", config, *ISSUE_FLAGS, "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def full():
    r = budget.report(budget.parse_args(["--config", FULL, *ISSUE_FLAGS]))
    return json.loads(json.dumps(r))          # what --json prints


def test_expert_layer_bytes_full(full):
    d, f = 4096, 11008
    xl = full["expert_layer"]
    assert xl["trits"] == 3 * d * f
    assert xl["bytes_2bit"] == 2 * math.ceil(d / 4) * f + math.ceil(f / 4) * d + 3 * 4
    assert xl["bytes_base3"] == 3 * math.ceil(d * f / 5) + 3 * 4
    assert round(xl["bytes_base3"] / 1e6, 2) == 27.05            # SPEC §3.5
    # SPEC §3.5: 27.05 MB at 7 GB/s = 3.86 ms
    assert round(full["speed"]["base3_pcie_ms"], 2) == 3.86
    assert full["speed"]["full_load_pcie_ms"] == pytest.approx(xl["bytes_2bit"] / 7e9 * 1e3)


def test_disk_and_lattice_full(full):
    assert (full["expert_layers"], full["experts"]) == (60, 128)
    assert full["neighbour_pairs"] == 128 * 6 // 2 and full["directed_neighbours"] == 128 * 6
    codes = 2 * 1024 * 11008 + 2752 * 4096
    disk = full["disk"]
    assert disk["expert store (2bit, 4096 B-aligned regions)"] == 60 * 128 * (
        -(-codes // 4096) * 4096)
    assert disk["expert store, other format (base3)"] == 60 * 128 * full["expert_layer"][
        "bytes_base3"]
    assert disk["neighbour deltas (directed, --delta-share)"] == int(
        60 * 768 * 0.1 * full["expert_layer"]["bytes_2bit"])


def test_device_items_full(full):
    d, r, f, v = 4096, 256, 11008, 32768
    state = full["decode_state"]
    assert state["GQA KV ring caches"] == 2 * 512 * 8 * 128 * 4 * 20
    assert state["PDR states"] == 60 * d * r * 4
    shared = full["shared_weights"]
    matrix_params = (60 * (3 * d * d + 2 * d * r) + 20 * (d * 4096 + 2 * d * 1024 + 4096 * d)
                     + 20 * 3 * d * f)
    assert shared["2-bit GPTQ codes"] == matrix_params // 4
    assert shared["GPTQ group scale+zero"] == matrix_params // 64 * 4   # fp16 scale + zero
    assert shared["embedding int8 + row scale (SPEC §3.4)"] == v * d + 4 * v   # as exported
    assert shared["expert scales, all experts (float32)"] == 60 * 128 * 3 * 4   # per matrix
    dev = full["device"]
    codes = 2 * math.ceil(d / 4) * f + math.ceil(f / 4) * d
    assert dev["expert double buffer (2 slots, 2-bit codes)"] == 2 * codes
    assert full["device_total"] == sum(dev.values())
    assert full["device_total"] < 4096 * 2 ** 20 and full["fits_envelope"]
    assert full["host_total"] == sum(full["host"].values()) <= 26000 * 2 ** 20
    assert abs(full["params"]["shared_params"] / 6.83e9 - 1) < 0.005


def test_speed_model_full(full):
    s = full["speed"]
    assert s["tok_s"] == pytest.approx(1e3 / (60 * s["ms_per_expert_layer"]))
    assert s["tok_s_all_full_from_disk"] < s["tok_s_all_full_cached"] < s["tok_s"] \
        < s["tok_s_compute_only"]
    assert s["flops_per_token"] >= 2 * full["params"]["active_params_per_token"]
    assert s["hit_rate"] == pytest.approx(full["host_cache_share"])   # uniform routing default
    assert 0 <= s["max_full_share_for_gate_at_hit_rate"] <= s["max_full_share_for_gate_all_cached"]


def test_markdown_full(capsys):
    assert budget.run(["--config", FULL, *ISSUE_FLAGS]) == 0
    out = capsys.readouterr().out
    assert "| **total** |" in out and "tok/s" in out
    assert "fits the 4,096.0 MiB device / 32,768.0 MiB RAM envelope" in out
    assert out.count("PASS") + out.count("FAIL") >= 5


def test_tiny_json(capsys):
    r = run_json(capsys, TINY)
    d, f = 128, 384
    assert r["routed_forced"] and r["expert_layers"] == 3 and r["experts"] == 8
    assert r["expert_layer"]["bytes_2bit"] == 2 * (d // 4) * f + (f // 4) * d + 12
    assert r["neighbour_pairs"] == 12 and r["directed_neighbours"] == 24   # 2×2×2
    assert r["decode_state"]["GQA KV ring caches"] == 2 * 64 * 2 * 32 * 4 * 1
    assert r["decode_state"]["PDR states"] == 3 * d * 32 * 4
    assert r["host_cache_expert_layers"] == 24 and r["speed"]["hit_rate"] == 1.0


def test_flags_change_the_sums(capsys):
    r = run_json(capsys, TINY, "--state-dtype", "bfloat16", "--wire-format", "base3",
                 "--same", "1", "--neighbour", "0", "--full", "0")
    assert r["decode_state"]["PDR states"] == 3 * 128 * 32 * 2
    assert r["expert_layer"]["wire_bytes"] == r["expert_layer"]["bytes_base3"]
    assert r["speed"]["tok_s"] == pytest.approx(r["speed"]["tok_s_compute_only"])


@pytest.mark.parametrize("args, message", [
    (["--same", "0.5"], "must sum to 1"),
    (["--pcie-gbs", "-1"], "argument --pcie-gbs: must lie in (0, 1000000], got -1"),
    (["--hit-rate", "1.5"], "argument --hit-rate: must lie in [0, 1], got 1.5"),
    (["--config", "no/such.yaml"], "config file not found"),
    (["--bogus"], "unrecognized arguments"),
    (["--same", "nan"], "'nan' is not a finite number"),
    (["--device-mb", "nan"], "'nan' is not a finite number"),
    (["--workspace-factor", "nan"], "'nan' is not a finite number"),
    (["--device-reserve-mb", "inf"], "'inf' is not a finite number"),
])
def test_bad_input_exits_2(capsys, args, message):
    argv = ["--config", TINY, *args] if args[0] != "--config" else args
    assert budget.run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_int8_embedding_and_per_row_scales(capsys):
    d, f, v = 4096, 11008, 32768
    base = run_json(capsys, FULL)                           # int8, as --shared-bits exports
    f32 = run_json(capsys, FULL, "--embedding", "float32")
    assert f32["shared_weights"]["embedding float32 (export --embedding float32)"] == 4 * v * d
    # the int8 head widens one block of rows to float32 (embedding_int8.BLOCK_ROWS), more
    # than a GPU prefill decodes at once (ternary_matmul.DEQUANT_BLOCK_BYTES)
    item = "largest call temporary (int8 head block / prefill dequant block)"
    assert base["device"][item] == 4 * 2048 * d and f32["device"][item] == 16 * 2**20
    assert f32["device_total"] - base["device_total"] == 3 * v * d - 4 * v - (32 - 16) * 2**20
    rows = run_json(capsys, FULL, "ternary.scale_granularity=row")
    per_layer = 4 * (f + f + d)                                  # gate, up [d, f]; down [f, d]
    assert rows["shared_weights"]["expert scales, all experts (float32)"] == 60 * 128 * per_layer
    assert rows["expert_layer"]["bytes_2bit"] - base["expert_layer"]["bytes_2bit"] == \
        per_layer - 12


def test_int8_embedding_counts_the_engines_padded_blocks(capsys):
    """V = 5000 is not a multiple of the 2,048-row head block: 3 blocks of 1,667 rows
    (1 padded row), as `embedding_int8.blocked` lays the table out on the device."""
    r = run_json(capsys, TINY, "model.vocab_size=5000")
    d = 128
    assert r["shared_weights"]["embedding int8 + row scale (SPEC §3.4)"] == 3 * 1667 * (d + 4)
    item = "largest call temporary (int8 head block / prefill dequant block)"
    assert r["device"][item] == max(4 * 1667 * d, 16 * 2**20)


@pytest.mark.parametrize("shares, hit", [((0, 0, 1), 1.0), ((0, 0, 1), 0.0), ((0.2, 0.5, 0.3), 0.25),
                                         ((1, 0, 0), 0.5)])
def test_speed_model_by_hand(capsys, shares, hit):
    """Per expert layer: Σ_kind share · E[max(compute, transfer)], transfer = bytes/PCIe
    on a host-cache hit and bytes/disk + bytes/PCIe on a miss; bytes = 0 (same),
    delta-share × region (neighbour), region (full) — docs/budget.md."""
    same, neighbour, full = shares
    r = run_json(capsys, FULL, "--same", str(same), "--neighbour", str(neighbour),
                 "--full", str(full), "--hit-rate", str(hit), "--delta-share", "0.1")
    s, xl = r["speed"], r["expert_layer"]["bytes_2bit"]
    compute = s["compute_ms_per_token"] / 60

    def move(nbytes):
        pcie, disk = nbytes / 7e9 * 1e3, nbytes / 6e9 * 1e3
        return hit * max(compute, pcie) + (1 - hit) * max(compute, disk + pcie)
    want = same * compute + neighbour * move(0.1 * xl) + full * move(xl)
    assert s["ms_per_expert_layer"] == pytest.approx(want, rel=1e-6)
    assert s["tok_s"] == pytest.approx(1e3 / (60 * want), rel=1e-6)


def test_envelope_called_directly_matches_the_command(capsys):
    """The library call with default `Assumptions` gives what the command prints, less
    the command's own config path and overrides."""
    cli = run_json(capsys, TINY)
    want = json.loads(json.dumps(envelope(load_config(TINY, []), Assumptions(
        device_mb=4096, ram_mb=32768, pcie_gbs=7, disk_gbs=6))))
    flags = cli.pop("flags")
    assert (flags.pop("config"), flags.pop("overrides")) == (TINY, [])
    assert flags == want.pop("flags") and cli == want


def test_module_entry_point_runs():
    """`python -m perspective_jax.cli.budget` (what the console script calls)."""
    proc = subprocess.run([sys.executable, "-m", "perspective_jax.cli.budget", "--config",
                           TINY, "--bogus"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: unrecognized arguments: --bogus")
