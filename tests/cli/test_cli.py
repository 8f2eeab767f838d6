"""perspective-info: census output, JSON, forward pass, and one-line errors."""

import json
import subprocess
import sys

from perspective_jax.cli.info import run


def test_info_json_for_every_preset(repo, capsys):
    for name in ("tiny", "small", "perspective-1t"):
        assert run(["--config", str(repo / "curricula" / f"{name}.yaml"), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["name"] == name and info["census"]["total_params"] > 0


def test_info_forward_pass_on_real_text(repo, shakespeare_path, capsys):
    assert run(["--config", str(repo / "curricula" / "tiny.yaml"), "--forward-text",
                str(shakespeare_path), "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "bits/byte" in out


def test_bad_config_exits_nonzero_with_one_line(repo, capsys):
    code = run(["--config", str(repo / "curricula" / "tiny.yaml"), "model.d_modle=3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "d_model" in err and "\n" not in err


def test_console_script_reports_missing_file_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "perspective_jax.cli.info", "--config",
                           str(tmp_path / "nope.yaml")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "not found" in proc.stderr
