"""The Perspective server a client command talks to: look one up over HTTP (standard
library only), or start `perspective-serve` on the loopback interface, wait until it
is ready and stop it again.

The server's contract: `GET /health` answers 503 while the model loads and 200 when
ready (no key needed); `GET /v1/models` lists the served model; every endpoint but
/health wants `Authorization: Bearer KEY` when the server has a key.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional

from perspective_jax.errors import UserError

# How a server is started; tests put a stand-in here.
SERVE_COMMAND = [sys.executable, "-m", "perspective_jax.cli.serve"]
LOOPBACK = "127.0.0.1"
POLL_S = 0.2            # between two readiness checks
STOP_GRACE_S = 10.0     # SIGTERM, then SIGKILL after this long
TAIL_LINES = 3          # lines of the server's output quoted when it fails

# Loopback requests never go through a proxy the environment names.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def api_root(url: str) -> str:
    """'http://host:port' from what a user passes: with or without a trailing '/v1'
    or '/'. Anything but an http(s) URL with a host is a UserError."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"--url {url!r} is not an http(s) URL such as "
                        "http://127.0.0.1:8000")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def health(root: str, timeout: float = 2.0) -> Optional[int]:
    """The HTTP status of GET root/health, or None when nothing answers there."""
    try:
        with _OPENER.open(root + "/health", timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def model_id(root: str, api_key: Optional[str], timeout: float = 30.0) -> str:
    """The id of the first model GET root/v1/models lists."""
    req = urllib.request.Request(root + "/v1/models")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            body = json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise UserError(f"the server at {root} refused the API key (HTTP {e.code}); "
                            "pass its key with --api-key-file FILE") from None
        raise UserError(f"GET {root}/v1/models failed: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise UserError(f"GET {root}/v1/models failed: {_reason(e)}") from None
    try:
        return str(body["data"][0]["id"])
    except (KeyError, IndexError, TypeError):
        raise UserError(f"{root}/v1/models lists no model") from None


def wait_ready(root: str, timeout_s: float, server: Optional["LocalServer"] = None) -> None:
    """Poll root/health until it answers 200, for at most `timeout_s` seconds. A
    server we started that exits meanwhile, or the time running out, is a UserError
    quoting the last lines of the server's output."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = health(root, timeout=min(2.0, max(0.1, deadline - time.monotonic())))
        if status == 200:
            return
        if server is not None and server.proc.poll() is not None:
            raise UserError(f"perspective-serve exited (status {server.proc.returncode}) "
                            f"before it was ready{server.tail()}")
        if time.monotonic() >= deadline:
            what = "perspective-serve" if server is not None else f"the server at {root}"
            seen = "nothing answered" if status is None else f"/health answered {status}"
            raise UserError(f"{what} was not ready within {timeout_s:g} s ({seen})"
                            f"{server.tail() if server is not None else ''}")
        time.sleep(POLL_S)


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class LocalServer:
    """`perspective-serve` run as a child process on 127.0.0.1:`port`, its key read
    from `key_file` (never on the command line), its stdout and stderr written to
    `log_path`. It runs in a session of its own, so a Ctrl-C at the terminal reaches
    only its parent, which stops it (`stop`)."""

    def __init__(self, model_dir: str, port: int, key_file: str, log_path: str,
                 extra_args: tuple = ()):
        self.root = f"http://{LOOPBACK}:{port}"
        self.log_path = log_path
        argv = [*SERVE_COMMAND, "--model-dir", model_dir, "--host", LOOPBACK,
                "--port", str(port), "--api-key-file", key_file, *extra_args]
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self) -> str:
        """'; last output: a | b | c' from the server's log ('' when it has none)."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(max(0, os.fstat(fh.fileno()).st_size - 16384))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return ""
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()][-TAIL_LINES:]
        return f"; last output: {' | '.join(lines)}" if lines else ""

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM to the server's process group, SIGKILL after `grace_s`; returns
        once it has exited."""
        stop_process(self.proc, grace_s, group=True)


def stop_process(proc: subprocess.Popen, grace_s: float, group: bool = False) -> None:
    """End `proc` (and with `group`, the process group it leads): SIGTERM, then
    SIGKILL if it is still running `grace_s` later. Waits for it to exit."""
    def send(sig):
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            pass

    if proc.poll() is None:
        send(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    if group:
        send(signal.SIGKILL)            # anything of the group still left, at once
    elif proc.poll() is None:
        send(signal.SIGKILL)
    proc.wait()


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or exc)
