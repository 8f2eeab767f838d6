"""The memory on perspective-serve and perspective-infer: `perspective.memory` (with
`perspective.mpd`) consults the server's memory where the views find no majority,
giving the tokens perspective-infer --mpd --memory gives; the Prometheus counters;
a 400 naming the field without MPD or on a server without a memory; the CLIs'
one-line errors (--memory without --mpd, a memory of another model)."""

import contextlib
import io
import json

import httpx
import pytest

from perspective_jax.cli import infer as infer_cli
from perspective_jax.cli import memory as memory_cli
from perspective_jax.config.schema import MPDConfig
from perspective_jax.errors import UserError
from perspective_jax.memory.recall import RecallConfig
from perspective_jax.serve.server import build_server
from serve_helpers import MODEL, running

# every step triggers (what MPD_FLAGS give perspective-infer; min_votes stays 3)
UNSURE = MPDConfig(every_k=1, p_min=0.0, h_max=100.0, tau=1e-5, max_rate=1.0)
FOUND = RecallConfig(min_similarity=0.5)          # any stored value counts as found
PROMPT, N = "The ", 8
MPD_FLAGS = ["--mpd", "--mpd-every-k", "1", "--mpd-p-min", "0", "--mpd-h-max", "100",
             "--mpd-tau", "0.00001", "--mpd-max-rate", "1"]


@pytest.fixture(scope="module")
def memory_file(exported_distinct, tmp_path_factory):
    _, _, path = exported_distinct
    out = str(tmp_path_factory.mktemp("memory") / "facts.hdm")
    assert memory_cli.run(["--memory", out, "--model-dir", path, "add", "The ", "zzzz"]) == 0
    return out


def _infer(path, memory, tmp_path):
    """perspective-infer's generated text and its --stats-json report."""
    stats, out = tmp_path / "stats.json", io.StringIO()
    with contextlib.redirect_stdout(out):
        assert infer_cli.run(["--model-dir", path, PROMPT, "--max-tokens", str(N),
                              "--temperature", "0", "--host-budget-mb", "1", *MPD_FLAGS,
                              "--memory", memory, "--memory-min-similarity", "0.5",
                              "--stats-json", str(stats)]) == 0
    text = out.getvalue()
    assert text.startswith(PROMPT) and text.endswith("\n")
    return text[len(PROMPT):-1], json.loads(stats.read_text())


@pytest.mark.slow
def test_served_memory_equals_perspective_infer(exported_distinct, memory_file, tmp_path):
    _, _, path = exported_distinct
    text, report = _infer(path, memory_file, tmp_path)
    m = report["memory"]
    assert m["lookups"] == m["hits"] == m["injections"] > 0
    with running(path, mpd=UNSURE, memory=memory_file, recall=FOUND) as server:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": N, "temperature": 0,
                "perspective": {"mpd": True, "memory": True}}
        resp = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["text"] == text
        plain = httpx.post(server.url + "/v1/completions", json={
            **body, "perspective": {"mpd": True}}, timeout=60).json()["choices"][0]["text"]
        assert plain != text                                   # the memory acted
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        assert f"perspective_memory_injections_total {float(m['injections'])}" in metrics
        no_mpd = httpx.post(server.url + "/v1/completions", json={
            **body, "perspective": {"memory": True}}, timeout=60)
        assert no_mpd.status_code == 400 and no_mpd.json()["error"]["param"] == \
            "perspective.memory"


def test_memory_on_a_server_without_one_is_a_400(served):
    server, _ = served
    resp = httpx.post(server.url + "/v1/completions", json={
        "model": MODEL, "prompt": "x", "max_tokens": 2,
        "perspective": {"mpd": True, "memory": True}}, timeout=60)
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["param"] == "perspective.memory" and "--memory" in err["message"]


def test_cli_errors_are_one_line(exported, exported_distinct, memory_file, capsys):
    _, _, other = exported
    _, _, path = exported_distinct
    assert infer_cli.run(["--model-dir", path, "x", "--memory", memory_file]) == 2
    err = capsys.readouterr().err.strip()
    assert "--mpd" in err and "\n" not in err
    assert infer_cli.run(["--model-dir", other, "x", "--mpd", "--memory", memory_file]) == 2
    err = capsys.readouterr().err.strip()
    assert "another model" in err and "\n" not in err
    with pytest.raises(UserError, match="another model"):
        build_server(other, memory=memory_file)
