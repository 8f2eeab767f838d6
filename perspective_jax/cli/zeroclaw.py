"""ZeroClaw, the agent runtime, pointed at a Perspective server for one task without
touching the user's own ZeroClaw setup (~/.zeroclaw).

What ZeroClaw reads (its source, `Config::load_or_init` and `apply_env_overrides`,
releases 0.1 to 0.7; 0.8 and later migrate such a file on load):
  * config.toml in `$ZEROCLAW_CONFIG_DIR` first — before `$ZEROCLAW_WORKSPACE`, the
    `~/.zeroclaw/active_workspace.toml` marker and `~/.zeroclaw/config.toml` — and its
    workspace beside it (`workspace/`, `data/` from 0.8);
  * `default_provider = "custom:<base URL>"`: an OpenAI-compatible server, chat at
    `<base URL>/chat/completions`, `api_key` sent as `Authorization: Bearer`;
  * environment overrides: ZEROCLAW_API_KEY or API_KEY replace `api_key`,
    ZEROCLAW_PROVIDER replaces `default_provider` (before MODEL_PROVIDER and
    PROVIDER), ZEROCLAW_MODEL or MODEL replace `default_model`.
So the task runs with its own config directory, ZEROCLAW_PROVIDER and ZEROCLAW_MODEL
naming the server, and no inherited ZEROCLAW_* or API_KEY variable; the key lives
only in the 0600 config file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Optional

from perspective_jax.cli.common import signals_deferred
from perspective_jax.cli.local_server import stop_process
from perspective_jax.errors import UserError

INSTALL_HINT = ("install it (see github.com/zeroclaw-labs/zeroclaw: `brew install "
                "zeroclaw`, or `cargo install --path . --locked` in its source) or pass "
                "--zeroclaw PATH")
CONFIG_FILE = "config.toml"
STOP_GRACE_S = 5.0       # an interrupted or timed-out agent: SIGTERM, then SIGKILL
PUMP_JOIN_S = 2.0        # output still owed by the agent's children after it exits
NO_PROXY_HOSTS = ("127.0.0.1", "localhost")


def find_zeroclaw(explicit: Optional[str]) -> str:
    """The zeroclaw executable: `explicit` (--zeroclaw), else `zeroclaw` on PATH."""
    if explicit:
        path = explicit if os.sep in explicit else shutil.which(explicit)
        if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
            raise UserError(f"--zeroclaw {explicit}: not an executable file")
        return os.path.abspath(path)
    path = shutil.which("zeroclaw")
    if path is None:
        raise UserError(f"zeroclaw is not installed (no zeroclaw on PATH): {INSTALL_HINT}")
    return path


def provider(root: str) -> str:
    """ZeroClaw's provider name for the OpenAI-compatible server at `root`."""
    return f"custom:{root}/v1"


def config_text(root: str, model: str, api_key: Optional[str]) -> str:
    """The config.toml that points ZeroClaw at the server at `root` serving `model`."""
    lines = ["# perspective-agent: ZeroClaw settings for one task", "",
             f"default_provider = {toml_string(provider(root))}",
             f"default_model = {toml_string(model)}"]
    if api_key:
        lines.append(f"api_key = {toml_string(api_key)}")
    return "\n".join(lines) + "\n"


def write_config(config_dir: str, root: str, model: str, api_key: Optional[str]) -> str:
    """Write `config_text` to config_dir/config.toml, readable by the owner only
    (it holds the key); returns its path."""
    path = os.path.join(config_dir, CONFIG_FILE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(config_text(root, model, api_key))
    return path


def agent_env(base: dict, config_dir: str, root: str, model: str) -> dict:
    """`base` (the caller's environment) without the variables through which ZeroClaw
    would read another configuration or key, plus those naming `config_dir`, the
    server and the model; loopback requests bypass any proxy."""
    env = {k: v for k, v in base.items()
           if not k.startswith("ZEROCLAW_") and k != "API_KEY"}
    env.update(ZEROCLAW_CONFIG_DIR=config_dir, ZEROCLAW_PROVIDER=provider(root),
               ZEROCLAW_MODEL=model)
    for name in ("NO_PROXY", "no_proxy"):
        have = [h for h in env.get(name, "").split(",") if h.strip()]
        env[name] = ",".join(have + [h for h in NO_PROXY_HOSTS if h not in have])
    return env


def run_agent(exe: str, task: str, env: dict, timeout_s: Optional[float] = None) -> int:
    """Run `zeroclaw agent -m TASK`, passing its stdout and stderr through to ours as
    they come; its exit status (128 + N when signal N ended it). Past `timeout_s` it
    is stopped: one line on stderr, status 124. Ctrl-C (KeyboardInterrupt) stops it
    and propagates."""
    proc, pumps = None, []
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        with signals_deferred():               # no interruption leaves it unrecorded
            try:
                proc = subprocess.Popen([exe, "agent", "-m", task], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            except OSError as e:
                raise UserError(f"cannot run {exe}: {e.strerror or e}") from None
        pumps = [threading.Thread(target=_pump, args=pair, daemon=True, name="pump")
                 for pair in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
        for p in pumps:
            p.start()
        try:
            status = proc.wait(None if deadline is None
                               else max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stop_process(proc, STOP_GRACE_S)
            _join(pumps, proc)
            print(f"error: the agent ran past --timeout {timeout_s:g} s and was stopped",
                  file=sys.stderr)
            return 124
    except BaseException:
        if proc is not None:
            stop_process(proc, STOP_GRACE_S)
            _join(pumps, proc)
        raise
    _join(pumps, proc)
    return status if status >= 0 else 128 - status


def _pump(src, dst) -> None:
    """Copy a child's output to `dst` chunk by chunk (each write flushed) until it
    ends; a `dst` that is gone (a closed pipe) is drained into nothing."""
    out = getattr(dst, "buffer", None)
    fd = src.fileno()
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            return
        if not data:
            return
        try:
            if out is not None:
                dst.flush()               # text written before, then these bytes
                out.write(data)
                out.flush()
            else:
                dst.write(data.decode("utf-8", "replace"))
                dst.flush()
        except (OSError, ValueError):
            pass


def _join(pumps, proc) -> None:
    """Wait (briefly) for the copies to finish; close the pipes of those that did."""
    for pump, pipe in zip(pumps, (proc.stdout, proc.stderr)):
        pump.join(PUMP_JOIN_S)
        if not pump.is_alive():
            pipe.close()


def toml_string(text: str) -> str:
    """`text` as a TOML basic string."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
