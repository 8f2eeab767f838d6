"""perspective-agent: ZeroClaw pointed at a Perspective server for one task.

A stand-in `zeroclaw` (zeroclaw_stub.py, first on PATH) reads the configuration the
way ZeroClaw does and calls the server with the official openai client. The
orchestration is tested against a stand-in server with perspective-serve's contract
(fake_serve.py); the end-to-end tests run the real perspective-serve on the
`exported` model.
"""

import json
import os
import pathlib
import signal
import stat
import subprocess
import sys
import time
import tomllib

import pytest

from perspective_jax.cli import agent, local_server, zeroclaw

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
FAKE_SERVE = [sys.executable, str(HERE / "fake_serve.py")]
TASK = 'say "hi" \\ then stop'
WAIT_S = 60                         # the bound of every wait on a child in these tests


@pytest.fixture
def stub_bin(tmp_path, monkeypatch):
    """A bin directory, first on PATH, holding the stand-in zeroclaw."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    source = (HERE / "zeroclaw_stub.py").read_text().split("\n", 1)[1]
    exe = bin_dir / "zeroclaw"
    exe.write_text(f"#!{sys.executable}\n{source}")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


@pytest.fixture
def fake_serve(monkeypatch, tmp_path):
    """perspective-agent starts the stand-in server; its pid and argv land in a file."""
    record = tmp_path / "serve.json"
    monkeypatch.setattr(local_server, "SERVE_COMMAND", FAKE_SERVE)
    monkeypatch.setenv("FAKE_SERVE_RECORD", str(record))
    return record


@pytest.fixture
def decoy_home(tmp_path, monkeypatch):
    """The user's own ZeroClaw setup, which a run must neither read nor change: a
    ~/.zeroclaw pointing elsewhere and ZeroClaw variables in the environment."""
    home = tmp_path / "home"
    (home / ".zeroclaw").mkdir(parents=True)
    (home / ".zeroclaw" / "config.toml").write_text(
        'default_provider = "openrouter"\napi_key = "sk-user"\n')
    monkeypatch.setenv("HOME", str(home))
    for name, value in (("ZEROCLAW_API_KEY", "sk-user-env"), ("API_KEY", "sk-generic"),
                        ("ZEROCLAW_PROVIDER", "openrouter"), ("ZEROCLAW_MODEL", "user-model"),
                        ("ZEROCLAW_WORKSPACE", str(home / ".zeroclaw"))):
        monkeypatch.setenv(name, value)
    return home


def report(out: str) -> dict:
    lines = [ln for ln in out.splitlines() if ln.startswith("stub-report ")]
    assert len(lines) == 1, out
    return json.loads(lines[0][len("stub-report "):])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not pathlib.Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"


def snapshot(path: pathlib.Path) -> dict:
    return {str(p): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# (a) zeroclaw missing ------------------------------------------------------------------

def test_missing_zeroclaw_is_one_line_before_any_server(tmp_path, monkeypatch, fake_serve,
                                                        capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    start = time.monotonic()
    code = agent.run(["--swarm-task", TASK, "--model-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - start < 5
    assert err.startswith("error: zeroclaw is not installed") and "--zeroclaw PATH" in err
    assert err.count("\n") == 1 and not fake_serve.exists()       # no server was started
    assert agent.run(["--swarm-task", TASK, "--model-dir", str(tmp_path), "--zeroclaw",
                      str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "--zeroclaw" in err and "not an executable" in err and err.count("\n") == 1


def test_missing_zeroclaw_from_the_command_line(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "perspective_jax.cli.agent", "--swarm-task",
                           TASK, "--model-dir", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=WAIT_S)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "zeroclaw is not installed" in proc.stderr and "Traceback" not in proc.stderr


# (b) what ZeroClaw is given -------------------------------------------------------------

def test_config_file_is_private_and_parses_back(tmp_path):
    model = 'odd "name" \\ with\nnewline and ünïcode 🙂'
    path = zeroclaw.write_config(str(tmp_path), "http://127.0.0.1:1234", model, "k-1")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert tomllib.loads(pathlib.Path(path).read_text()) == {
        "default_provider": "custom:http://127.0.0.1:1234/v1", "default_model": model,
        "api_key": "k-1"}
    keyless = zeroclaw.config_text("http://127.0.0.1:1", "m", None)
    assert "api_key" not in tomllib.loads(keyless)


def test_environment_names_only_the_private_config(tmp_path):
    base = {"PATH": "/bin", "HOME": "/home/u", "ZEROCLAW_API_KEY": "x", "API_KEY": "y",
            "ZEROCLAW_WORKSPACE": "/w", "ZEROCLAW_CONFIG_DIR": "/c", "NO_PROXY": "corp"}
    env = zeroclaw.agent_env(base, str(tmp_path), "http://127.0.0.1:9", "tiny")
    assert {k: env[k] for k in env if k.startswith("ZEROCLAW_")} == {
        "ZEROCLAW_CONFIG_DIR": str(tmp_path), "ZEROCLAW_MODEL": "tiny",
        "ZEROCLAW_PROVIDER": "custom:http://127.0.0.1:9/v1"}
    assert "API_KEY" not in env and env["PATH"] == "/bin" and env["HOME"] == "/home/u"
    assert env["NO_PROXY"] == "corp,127.0.0.1,localhost"
    assert "x" not in env.values() and "y" not in env.values()


def test_zeroclaw_reads_the_private_config_not_the_users(tmp_path, stub_bin, decoy_home):
    """Where ZeroClaw looks, with the user's own ~/.zeroclaw and ZEROCLAW_* variables
    in place, it finds perspective-agent's config, key and model."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    zeroclaw.write_config(str(private), "http://127.0.0.1:9", "tiny", "k-2")
    env = zeroclaw.agent_env(dict(os.environ), str(private), "http://127.0.0.1:9", "tiny")
    before = snapshot(decoy_home)
    proc = subprocess.run(["zeroclaw", "agent", "-m", TASK], env={**env, "STUB_DRY": "1"},
                          capture_output=True, text=True, timeout=WAIT_S)
    got = report(proc.stdout)
    assert proc.returncode == 3, proc.stderr
    assert (got["config_dir"], got["base_url"], got["model"], got["key"], got["task"]) == (
        str(private), "http://127.0.0.1:9/v1", "tiny", "k-2", TASK)
    assert (got["dir_mode"], got["file_mode"]) == ("0o700", "0o600")
    assert snapshot(decoy_home) == before


# orchestration, against the stand-in server ------------------------------------------

def test_starts_the_server_runs_the_agent_and_stops_the_server(tmp_path, stub_bin,
                                                               fake_serve, decoy_home,
                                                               capfd):
    code = agent.run(["--swarm-task", TASK, "--model-dir", str(tmp_path / "home"),
                      "--served-model-name", "tiny"])
    out, err = capfd.readouterr()
    got = report(out)
    assert code == 3, err                                       # zeroclaw's status
    assert got["reply"]["content"] == f"echo: {TASK}" and got["model"] == "tiny"
    assert f"reply: echo: {TASK}" in out and "stub zeroclaw: done" in err
    assert got["base_url"].startswith("http://127.0.0.1:")
    assert (got["dir_mode"], got["file_mode"]) == ("0o700", "0o600")
    assert not os.path.exists(got["config_dir"])                # removed afterwards
    served = json.loads(fake_serve.read_text())
    assert got["key"] and got["key"] not in " ".join(served["argv"])   # a key file only
    assert not alive(served["pid"])                             # stopped
    assert local_server.health(got["base_url"][:-3]) is None


def test_a_server_that_dies_is_one_line_with_its_last_output(tmp_path, stub_bin, fake_serve,
                                                             monkeypatch, capfd):
    monkeypatch.setenv("FAKE_SERVE_FAIL", "1")
    monkeypatch.setenv("STUB_PIDFILE", str(tmp_path / "stub.pid"))
    code = agent.run(["--swarm-task", TASK, "--model-dir", str(tmp_path)])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: perspective-serve exited (status 1)")
    assert "boom: cannot load the model" in err[-1]
    assert not (tmp_path / "stub.pid").exists()                 # the agent never ran


def test_a_server_never_ready_is_stopped_after_the_startup_timeout(tmp_path, stub_bin,
                                                                   fake_serve, monkeypatch,
                                                                   capfd):
    monkeypatch.setenv("FAKE_SERVE_HANG", "1")
    code = agent.run(["--swarm-task", TASK, "--model-dir", str(tmp_path),
                      "--startup-timeout", "1.5"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and "was not ready within 1.5 s (/health answered 503)" in err[-1]
    assert not alive(json.loads(fake_serve.read_text())["pid"])


def test_an_agent_past_its_timeout_is_stopped(tmp_path, stub_bin, fake_serve, monkeypatch,
                                              capfd):
    monkeypatch.setenv("STUB_SLEEP", "60")
    monkeypatch.setenv("STUB_PIDFILE", str(tmp_path / "stub.pid"))
    start = time.monotonic()
    code = agent.run(["--swarm-task", TASK, "--model-dir", str(tmp_path), "--timeout", "3"])
    err = capfd.readouterr().err
    assert code == 124 and "ran past --timeout 3 s" in err
    assert time.monotonic() - start < 30
    assert not alive(int((tmp_path / "stub.pid").read_text()))
    assert not alive(json.loads(fake_serve.read_text())["pid"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_stops_both_children(tmp_path, stub_bin, sig):
    launcher = tmp_path / "launch.py"
    # SIGINT as a terminal gives it: pytest-xdist's workers ignore SIGINT, an ignored
    # SIGINT is inherited, and Python then installs no KeyboardInterrupt handler
    launcher.write_text(
        "import signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from perspective_jax.cli import agent, local_server\n"
        f"local_server.SERVE_COMMAND = {FAKE_SERVE!r}\nsys.exit(agent.run(sys.argv[1:]))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "STUB_SLEEP": "60",
           "STUB_PIDFILE": str(tmp_path / "stub.pid"),
           "FAKE_SERVE_RECORD": str(tmp_path / "serve.json")}
    proc = subprocess.Popen([sys.executable, str(launcher), "--swarm-task", TASK,
                             "--model-dir", str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()                    # the stub has called the server
        assert line.startswith("stub-report "), proc.stderr.read() if not line else line
        private = json.loads(line[len("stub-report "):])["config_dir"]
        proc.send_signal(sig)
        assert proc.wait(WAIT_S) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "interrupted" in proc.stderr.read()
    assert not alive(int((tmp_path / "stub.pid").read_text()))
    assert not alive(json.loads((tmp_path / "serve.json").read_text())["pid"])
    assert not os.path.exists(private)


def test_url_and_port_reuse_a_running_server_and_leave_it_running(tmp_path, stub_bin,
                                                                  capfd):
    key_file = tmp_path / "key"
    key_file.write_text("k-reuse\n")
    port = local_server.free_port()
    server = subprocess.Popen([*FAKE_SERVE, "--model-dir", str(tmp_path / "m"), "--port",
                               str(port), "--api-key-file", str(key_file)],
                              stderr=subprocess.DEVNULL)
    try:
        root = f"http://127.0.0.1:{port}"
        local_server.wait_ready(root, WAIT_S)
        for where in (["--url", root + "/v1/"], ["--port", str(port)]):
            code = agent.run(["--swarm-task", TASK, *where, "--api-key-file", str(key_file)])
            out, err = capfd.readouterr()
            got = report(out)
            assert code == 3 and got["reply"]["content"] == f"echo: {TASK}", err
            assert got["base_url"] == root + "/v1" and got["key"] == "k-reuse"
            assert server.poll() is None                        # still running
        assert agent.run(["--swarm-task", TASK, "--url", root]) == 2   # no key given
        err = capfd.readouterr().err
        assert "refused the API key" in err and err.count("\n") == 1
    finally:
        local_server.stop_process(server, 5)


def test_keep_server_leaves_a_started_server_running(tmp_path, stub_bin, fake_serve, capfd):
    key_file = tmp_path / "key"
    key_file.write_text("k-kept")
    assert agent.run(["--swarm-task", TASK, "--model-dir", str(tmp_path),
                      "--keep-server"]) == 2                          # no key file
    assert "--keep-server needs --api-key-file" in capfd.readouterr().err
    code = agent.run(["--swarm-task", TASK, "--model-dir", str(tmp_path), "--keep-server",
                      "--api-key-file", str(key_file), "--server-log", str(tmp_path / "log")])
    out, err = capfd.readouterr()
    pid = json.loads(fake_serve.read_text())["pid"]
    try:
        assert code == 3 and f"keeps running at {report(out)['base_url'][:-3]}" in err
        assert "listening on" in (tmp_path / "log").read_text()
        assert alive(pid) and local_server.model_id(report(out)["base_url"][:-3],
                                                    "k-kept") == os.path.basename(tmp_path)
    finally:
        os.kill(pid, signal.SIGTERM)


def test_stop_process_kills_what_ignores_sigterm():
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal("
                              "signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); "
                              "time.sleep(60)"], stdout=subprocess.PIPE)
    child.stdout.readline()
    start = time.monotonic()
    local_server.stop_process(child, grace_s=0.5)
    assert child.returncode == -signal.SIGKILL and time.monotonic() - start < 10


@pytest.mark.parametrize("url, root", [
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
    ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000"),
    ("https://host:1/base/v1", "https://host:1/base")])
def test_api_root(url, root):
    assert local_server.api_root(url) == root


def test_flags_that_need_a_started_server_are_refused_with_url(capsys, stub_bin):
    assert agent.run(["--swarm-task", TASK, "--url", "http://127.0.0.1:1", "--port", "9"]) == 2
    assert agent.run(["--swarm-task", "  ", "--url", "http://127.0.0.1:1"]) == 2
    assert agent.run(["--swarm-task", TASK, "--url", "ftp://x"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)


# (c), (d) end to end with the real perspective-serve ----------------------------------

def _serve_e2e(model_dir, port, key_file):
    return subprocess.Popen([sys.executable, "-m", "perspective_jax.cli.serve",
                             "--model-dir", model_dir, "--port", str(port),
                             "--api-key-file", str(key_file)],
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _agent_e2e(args, extra_env=None, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "perspective_jax.cli.agent", "--swarm-task",
                           TASK, "--startup-timeout", "300", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_end_to_end_on_the_real_server(exported, stub_bin, decoy_home):
    _, _, model_dir = exported
    before = snapshot(decoy_home)
    proc = _agent_e2e(["--model-dir", model_dir])
    assert proc.returncode == 3, proc.stderr[-3000:]
    got = report(proc.stdout)
    assert got["reply"] is not None and got["model"]
    assert not os.path.exists(got["config_dir"])
    assert local_server.health(got["base_url"][:-3]) is None      # the server is stopped
    assert snapshot(decoy_home) == before


@pytest.mark.slow
def test_end_to_end_reusing_a_running_real_server(exported, stub_bin, tmp_path):
    _, _, model_dir = exported
    key_file = tmp_path / "key"
    key_file.write_text("k-e2e")
    port = local_server.free_port()
    server = _serve_e2e(model_dir, port, key_file)
    try:
        root = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while local_server.health(root) != 200:
            assert server.poll() is None, server.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "perspective-serve not ready in 300 s"
            time.sleep(0.5)
        proc = _agent_e2e(["--url", root, "--api-key-file", str(key_file)],
                          {"STUB_EXIT": "0"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = report(proc.stdout)
        assert got["key"] == "k-e2e" and got["base_url"] == root + "/v1"
        assert got["reply"] is not None
        assert server.poll() is None and local_server.health(root) == 200   # left running
    finally:
        local_server.stop_process(server, 10)
