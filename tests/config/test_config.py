"""Config schema, YAML inheritance, overrides and one-line errors."""

import glob

import pytest
import yaml

from perspective_jax.config import PerspectiveConfig, load_config, save_config, to_dict
from perspective_jax.config.schema import ModelConfig, MoEConfig
from perspective_jax.errors import ConfigError


def shipped_yamls(repo):
    files = sorted(glob.glob(str(repo / "curricula" / "*.yaml")))
    assert files, "no presets found in curricula/"
    return files


def test_every_shipped_yaml_parses(repo):
    for path in shipped_yamls(repo):
        cfg = load_config(path)
        assert isinstance(cfg, PerspectiveConfig)


def test_presets_have_expected_sizes(repo):
    tiny = load_config(str(repo / "curricula" / "tiny.yaml"))
    assert tiny.model.n_layers == 4 and tiny.name == "tiny"
    full = load_config(str(repo / "curricula" / "perspective-1t.yaml")).model
    assert (full.d_model, full.n_layers, full.d_ff, full.pdr_rank) == (4096, 80, 11008, 256)
    assert (full.n_heads, full.n_kv_heads, full.head_dim, full.window) == (32, 8, 128, 512)
    assert full.vocab_size == 32768 and (full.n_pdr_layers, full.n_gqa_layers) == (60, 20)
    moe = load_config(str(repo / "curricula" / "perspective-1t.yaml")).moe
    assert moe.num_experts == 128 and moe.lattice == (8, 4, 4)


def test_base_config_inheritance_and_overrides(tmp_path):
    (tmp_path / "parent.yaml").write_text("model: {d_model: 64, n_layers: 8}\ntrain: {steps: 5}\n")
    (tmp_path / "child.yaml").write_text("base_config: parent.yaml\nmodel: {d_model: 96}\n")
    cfg = load_config(str(tmp_path / "child.yaml"),
                      ["train.steps=7", "train.warmup_steps=2",
                       "model.layer_pattern=[pdr, gqa]"])
    assert cfg.model.d_model == 96          # child wins
    assert cfg.model.n_layers == 8          # inherited
    assert cfg.train.steps == 7             # override wins
    assert cfg.model.layer_pattern == ("pdr", "gqa")
    assert load_config(None, ["train.learning_rate=3e-3"]).train.learning_rate == 3e-3


def test_resolved_config_round_trips(tmp_path, repo):
    cfg = load_config(str(repo / "curricula" / "tiny.yaml"), ["model.d_model=96"])
    out = tmp_path / "resolved.yaml"
    save_config(cfg, str(out))
    assert "base_config" not in yaml.safe_load(out.read_text())
    assert load_config(str(out)) == cfg
    assert to_dict(cfg)["model"]["d_model"] == 96


@pytest.mark.parametrize("overrides,needle", [
    (["model.d_modle=3"], "did you mean 'd_model'"),
    (["modle.d_model=3"], "did you mean 'model'"),
    (["model.n_heads=6", "model.n_kv_heads=4"], "model.n_heads"),
    (["model.n_layers=6"], "model.n_layers"),
    (["model.d_ff=0"], "model.d_ff"),
    (["model.d_model=abc"], "model.d_model: expected an integer"),
    (["model.layer_pattern=[pdr, mlp]"], "model.layer_pattern"),
    (["moe.num_experts=9"], "moe.lattice"),
    (["model.pdr_impl=matmul", "model.pdr_chunk=16", "model.pdr_sub=5"], "model.pdr_sub"),
    (["train.batch_size=10", "train.grad_accum=3"], "train.batch_size"),
    (["model.pdr_init_decay=1.5"], "model.pdr_init_decay"),
    (["model"], "section.key=value"),
    (["train.learning_rate=.inf"], "train.learning_rate: expected a finite number"),
    (["model.rope_theta=.inf"], "model.rope_theta: expected a finite number"),
    (["moe.router_temperature=.nan"], "moe.router_temperature: expected a finite number"),
    (["model.pdr_init_noise=-.inf"], "model.pdr_init_noise: expected a finite number"),
    (["train.grad_clip=nan"], "train.grad_clip: expected a finite number"),
    (["train.weight_decay=1" + "0" * 400], "train.weight_decay: number too large"),
    (["model.d_model=99999999999999999999"], "model.d_model: 99999999999999999999 is out"),
    (["moe.lattice=[2, 2, -99999999999999999999]"], "moe.lattice[2]: -9999"),
    (["train.seed=-1"], "train.seed: must lie in [0, 2147483647], got -1"),
    (["data.seed=4294967296"], "data.seed: must lie in [0, 2147483647]"),
    (["data.binary_files=keep"], "data.binary_files: use one of ('skip', 'refuse')"),
])
def test_bad_config_gives_one_line_error_naming_the_field(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_bad_yaml_files(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_config(str(tmp_path / "bad.yaml"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "a.yaml").write_text("base_config: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base_config: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))


def test_unreadable_config_files_name_the_file(tmp_path):
    """Binary bytes, a non-path base_config, a directory: one line naming the path."""
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "b5.yaml").write_text("base_config: 5\n")
    (tmp_path / "date.yaml").write_text("name: 2020-13-45\n")
    for name, needle in (("bin.yaml", "not a UTF-8 text file"),
                         ("b5.yaml", "base_config must be a path to a YAML file, got 5"),
                         ("date.yaml", "invalid YAML value")):
        with pytest.raises(ConfigError) as err:
            load_config(str(tmp_path / name))
        assert str(tmp_path / name) in str(err.value) and needle in str(err.value)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path))


def test_cli_reports_bad_config_in_one_line(tmp_path, capsys, repo):
    from perspective_jax.cli.info import run
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00")
    tiny = str(repo / "curricula" / "tiny.yaml")
    for argv in (["--config", tiny, "model.d_model=99999999999999999999"],
                 ["--config", str(tmp_path / "bin.yaml")], ["--config", str(tmp_path)]):
        assert run(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and "Traceback" not in err


def test_dataclasses_validate_on_direct_construction():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelConfig(n_heads=5, n_kv_heads=2)
    with pytest.raises(ConfigError, match="lattice"):
        MoEConfig(num_experts=8, lattice=(2, 2, 3))


def test_duplicate_keys_and_empty_files_are_errors(tmp_path):
    """PyYAML keeps the last of two equal keys; an empty file read as no config."""
    cases = {"dup.yaml": ("model:\n  d_model: 64\n  d_model: 96\n",
                          "line 3: duplicate key 'd_model' (first given at line 2)"),
             "dup_section.yaml": ("model: {d_model: 64}\ntrain: {steps: 3}\nmodel: {}\n",
                                  "line 3: duplicate key 'model' (first given at line 1)"),
             "empty.yaml": ("", "the config file is empty"),
             "comments.yaml": ("# nothing here\n\n", "the config file is empty")}
    for name, (body, needle) in cases.items():
        (tmp_path / name).write_text(body)
        with pytest.raises(ConfigError) as err:
            load_config(str(tmp_path / name))
        assert str(tmp_path / name) in str(err.value) and needle in str(err.value)
        assert "\n" not in str(err.value)
    (tmp_path / "merge.yaml").write_text("base: &b {steps: 4, warmup_steps: 1}\n"
                                         "train:\n  <<: *b\n  steps: 5\n")
    with pytest.raises(ConfigError, match="unknown config key 'base'"):   # merges are fine
        load_config(str(tmp_path / "merge.yaml"))
