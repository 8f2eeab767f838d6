"""The safety polytope in an export: a safety run exports its source model with it,
--polytope adds one to any export, the manifest lists it, and inference reads it back
only when it matches the manifest (`infer.polytope_loader`)."""

import hashlib
import json
import os

import numpy as np
import pytest

from perspective_jax.cli import export
from perspective_jax.infer.polytope_loader import load_model_polytope
from perspective_jax.modeldir import format as md
from perspective_jax.modeldir.manifest import read_manifest
from perspective_jax.safety.polytope import Polytope
from perspective_jax.safety.polytope_file import read_polytope, write_polytope


def _sha(path) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


@pytest.fixture(scope="module")
def exports(tiny_align_run, safety_run, tmp_path_factory):
    """{"plain": the align run exported alone, "safety": the safety run exported,
    "int8": the align run exported with --polytope and an int8 head}."""
    root = tmp_path_factory.mktemp("exports")
    out = {"plain": str(root / "plain"), "safety": str(root / "safety"),
           "int8": str(root / "int8")}
    assert export.run(["--run-dir", tiny_align_run, "--out", out["plain"]]) == 0
    assert export.run(["--run-dir", safety_run, "--out", out["safety"]]) == 0
    assert export.run(["--run-dir", tiny_align_run, "--out", out["int8"], "--embedding", "int8",
                       "--polytope", os.path.join(safety_run, "polytope.spp")]) == 0
    return out


def _same(a: Polytope, b: Polytope) -> None:
    for name in ("support_normals", "support_bounds", "flag_tokens", "flag_caps", "interior"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert (a.eps, a.flagged) == (b.eps, b.flagged)


@pytest.mark.parametrize("which", ["safety", "int8"])
def test_the_polytope_is_written_listed_and_read_back(exports, safety_run, which):
    model = exports[which]
    built = os.path.join(safety_run, "polytope.spp")
    manifest = read_manifest(model)
    entry = manifest[md.SAFETY_KEY]
    assert entry["file"] == "polytope.spp" and entry["flagged"] == ["import", "def "]
    assert manifest["files"]["polytope.spp"]["sha256"] == _sha(built) == _sha(
        os.path.join(model, "polytope.spp"))
    assert manifest["source_run"] == "align"                     # the source model, not "safety"
    poly = load_model_polytope(model, manifest)
    _same(poly, read_polytope(built))
    assert (entry["support_rows"], entry["flagged_rows"]) == (len(poly.support_bounds),
                                                              len(poly.flag_tokens))


def test_without_a_polytope_the_manifest_is_as_before(exports):
    plain, with_poly = read_manifest(exports["plain"]), read_manifest(exports["safety"])
    assert md.SAFETY_KEY not in plain and load_model_polytope(exports["plain"], plain) is None
    assert not os.path.exists(os.path.join(exports["plain"], "polytope.spp"))
    assert set(plain) == set(with_poly) - {md.SAFETY_KEY}
    assert set(plain["files"]) == set(with_poly["files"]) - {"polytope.spp"}
    for rel, info in plain["files"].items():                      # the same model otherwise
        assert info == with_poly["files"][rel], rel


def test_a_flipped_byte_in_the_exported_polytope_is_one_line(exports, tmp_path):
    import shutil
    model = str(tmp_path / "model")
    shutil.copytree(exports["safety"], model, copy_function=shutil.copyfile)
    path = os.path.join(model, "polytope.spp")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    manifest = read_manifest(model)                # sizes still match: the hash catches it
    with pytest.raises(md.ModelDirError) as err:
        load_model_polytope(model, manifest)
    assert "polytope.spp fails its sha256 checksum" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_polytope_of_another_width_is_refused_before_any_work(tiny_align_run, tmp_path,
                                                                capsys):
    d = 16
    poly = Polytope(np.eye(d, dtype=np.float32), np.ones(d, np.float32), 0.1, ("x",),
                    np.array([5], np.int32), np.array([1.0], np.float32),
                    np.zeros(d, np.float32))
    path = str(tmp_path / "other.spp")
    write_polytope(path, poly)
    out = str(tmp_path / "model")
    assert export.run(["--run-dir", tiny_align_run, "--out", out, "--polytope", path]) == 2
    err = capsys.readouterr().err.strip()
    assert "built for a model of width 16" in err and "\n" not in err
    assert not os.path.exists(out)
    open(path, "r+b").write(b"XXXX")                             # not a polytope file
    assert export.run(["--run-dir", tiny_align_run, "--out", out, "--polytope", path]) == 2
    assert "is not a usable polytope file" in capsys.readouterr().err


def test_a_safety_run_whose_source_is_gone_is_one_line(safety_run, tmp_path, capsys):
    import shutil
    copy = tmp_path / "safety"
    shutil.copytree(safety_run, copy)
    record = json.load(open(copy / "safety.json"))
    record["source"] = str(tmp_path / "gone")
    from perspective_jax.rundir.layout import save_safety_record
    save_safety_record(str(copy), {k: v for k, v in record.items()
                                   if k not in ("sha256", "format")})
    assert export.run(["--run-dir", str(copy), "--out", str(tmp_path / "m")]) == 2
    assert "source run" in capsys.readouterr().err
