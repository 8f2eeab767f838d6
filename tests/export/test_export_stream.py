"""Streaming export (`--max-host-mb`): the checkpoint is read piece by piece and the
model directory written one period at a time, byte for byte what the whole-model
export writes; a cap below the largest piece is refused up front with the smallest
cap that fits.

The run here is a tiny align-stage run (two periods, routed ternary, a token store
for calibration) whose experts are near-copies of each other (so neighbour deltas
are kept) and whose parameters were saved sharded over 8 CPU devices along the
expert axis, so each stacked expert tensor is stored in several chunks and a
period's slice is read chunk by chunk."""

import dataclasses
import os
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from perspective_jax.errors import UserError
from perspective_jax.export import exporter
from perspective_jax.model import footprint
from perspective_jax.model.transformer import abstract_params
from perspective_jax.modeldir import format as md
from perspective_jax.modeldir.manifest import read_manifest
from perspective_jax.rundir.checkpoint import restore_params
from perspective_jax.rundir.partial_restore import ParamReader

from conftest import _small_cfg
from safety_helpers import tiny_run
from streaming_helpers import similar_experts

QUIET = dict(log=lambda *_: None)


def _sharded_run(path) -> str:
    """A finished align-stage run whose expert tensors are stored in 8 chunks each."""
    def similar_and_sharded(params, cfg):
        params = similar_experts(params, cfg, jax.random.key(1))
        mesh = Mesh(np.asarray(jax.devices()[:8]), ("expert",))

        def place(path, a):
            expert = path[-1].key in md.EXPERT_MATRICES and a.ndim == 4
            return jax.device_put(a, NamedSharding(
                mesh, PartitionSpec(None, "expert") if expert else PartitionSpec()))
        return jax.tree_util.tree_map_with_path(place, params)
    return tiny_run(path, _small_cfg(), shape_params=similar_and_sharded)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _sharded_run(tmp_path_factory.mktemp("stream") / "align")


def _files(path) -> dict:
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(root, name), "rb") as fh:
                out[os.path.relpath(os.path.join(root, name), path)] = fh.read()
    return out


def test_a_slice_read_from_the_checkpoint_equals_the_whole_restore_sliced(run):
    from perspective_jax.rundir.layout import load_run_config
    cfg = load_run_config(run)
    like = abstract_params(cfg.model, cfg.moe)
    whole = restore_params(run, like, source="--run-dir")
    reader = ParamReader(run, source="--run-dir")
    gate = "periods/layer_0/ffn/w_gate"
    assert reader.chunk_shape(gate) == (2, 1, 32, 48)            # one chunk per expert
    for path, leaf in jax.tree_util.tree_flatten_with_path(whole)[0]:
        name = "/".join(k.key for k in path)
        full = np.asarray(leaf)
        np.testing.assert_array_equal(reader.read(name), full)
        if name.startswith("periods/"):
            for p in range(full.shape[0]):
                np.testing.assert_array_equal(reader.read(name, (p,)), full[p])
        if name.endswith("ffn/w_down"):                               # [P, E, f, d]
            np.testing.assert_array_equal(reader.read(name, (1, 5)), full[1, 5])
    with pytest.raises(IndexError):
        reader.read(gate, (2,))


@pytest.mark.parametrize("flags", [{}, {"shared_bits": 2}])
def test_a_streamed_export_writes_the_same_bytes_as_a_whole_one(run, tmp_path, monkeypatch,
                                                               flags):
    epoch = time.gmtime(0)
    monkeypatch.setattr(md.time, "gmtime", lambda *_: epoch)       # the manifest's "created"
    whole = exporter.export_model(run, str(tmp_path / "whole"), **flags, **QUIET)
    restored = []
    monkeypatch.setattr(exporter, "restore_params", lambda *a, **k: restored.append(1))
    streamed = exporter.export_model(run, str(tmp_path / "streamed"), max_host_mb=4096,
                                     **flags, **QUIET)
    assert not restored                                  # never the whole model
    assert streamed == whole
    a, b = _files(tmp_path / "whole"), _files(tmp_path / "streamed")
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)
    manifest = read_manifest(str(tmp_path / "streamed"))
    assert any(layer["deltas"] for layer in manifest["experts"]["layers"])   # deltas kept
    assert bool(manifest["shared"]["quantized"]) == bool(flags)


def test_a_cap_below_the_largest_piece_is_refused_up_front_with_the_cap_that_fits(
        run, tmp_path, monkeypatch):
    out = str(tmp_path / "m")
    monkeypatch.setattr(ParamReader, "verify", lambda self: pytest.fail("verified"))
    with pytest.raises(UserError) as err:
        exporter.export_model(run, out, max_host_mb=1, **QUIET)
    text = str(err.value)
    assert text.startswith("--max-host-mb 1: one period of the export needs ~")
    assert "period weights" in text and "\n" not in text and not os.path.exists(out)
    fits = int(text.rsplit("--max-host-mb ", 1)[1].split()[0])
    monkeypatch.undo()
    with pytest.raises(UserError, match=f"pass --max-host-mb {fits} or more"):
        exporter.export_model(run, out, max_host_mb=fits - 1, **QUIET)
    exporter.export_model(run, out, max_host_mb=fits, **QUIET)
    read_manifest(out)


def test_the_cli_refusal_is_one_line(run, tmp_path, capsys):
    from perspective_jax.cli import export
    assert export.run(["--run-dir", run, "--out", str(tmp_path / "m"), "--shared-bits", "2",
                       "--max-host-mb", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --max-host-mb 1: one period") and err.count("\n") == 1
    assert "GPTQ Hessians (one period)" in err


def test_the_streamed_need_is_one_period_whatever_the_depth():
    from streaming_helpers import routed_cfg
    shallow = routed_cfg(_small_cfg())
    deep = dataclasses.replace(shallow, model=dataclasses.replace(shallow.model, n_layers=32))

    def streamed(cfg):
        return max(n.total for n in footprint.export_need(cfg, 2, 256, streamed=True))

    def whole(cfg):
        return dict(footprint.export_need(cfg, 2, 256)[0].parts)["params"]
    assert streamed(deep) == streamed(shallow)
    assert whole(deep) > 3 * whole(shallow)
    period = dict(footprint.export_need(deep, streamed=True)[1].parts)["period weights"]
    stacked, _ = footprint.param_split(deep.model, deep.moe)
    assert period == stacked // deep.model.n_periods * 4


def test_a_failure_part_way_through_leaves_nothing(run, tmp_path, monkeypatch):
    from perspective_jax.export import stream
    done = exporter.export_model(run, str(tmp_path / "m"), max_host_mb=4096, **QUIET)

    def boom(self):
        raise RuntimeError("failed after every period was written")
    monkeypatch.setattr(stream.TensorFile, "close", boom)
    with pytest.raises(RuntimeError, match="every period"):
        exporter.export_model(run, str(tmp_path / "broken"), max_host_mb=4096, **QUIET)
    assert sorted(os.listdir(tmp_path)) == ["m"]          # no model, no staging left
    assert read_manifest(str(tmp_path / "m")) == done
