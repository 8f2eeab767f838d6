"""perspective-agent: hand one task to ZeroClaw, the agent runtime, on a Perspective model.

    perspective-agent --swarm-task "list the files here" --model-dir models/tiny
    perspective-agent --swarm-task "..." --url http://127.0.0.1:8000 --api-key-file key

With --url (or --port P where a server already answers), that server is used; else
perspective-serve is started on a free loopback port with a fresh random key, and
stopped when the task ends. ZeroClaw reads a configuration of its own, written to a
private temporary directory that is removed afterwards; ~/.zeroclaw is not touched.
The exit status is ZeroClaw's.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import sys
import tempfile
from typing import Optional

from perspective_jax.cli import local_server, zeroclaw
from perspective_jax.cli.common import (OneLineParser, check_output_file, cli_entry,
                                        exit_with, float_in, int_in,
                                        signals_deferred, signals_handled)
from perspective_jax.errors import UserError

KEY_FILE = "api-key"
SERVE_LOG = "serve.log"
MAX_SECONDS = 1e7
PREFIX = "perspective-agent: "


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="perspective-agent", description=__doc__.splitlines()[0])
    p.add_argument("--swarm-task", required=True, metavar="TASK",
                   help="the task, as ZeroClaw's `agent -m` message")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--model-dir", help="start perspective-serve on this exported model")
    where.add_argument("--url", help="use the perspective-serve already running here, "
                       "e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key-file", metavar="FILE",
                   help="the server's API key (--url, or the key a started server gets; "
                        "default: a fresh random key)")
    p.add_argument("--zeroclaw", metavar="PATH", help="the zeroclaw executable "
                   "(default: zeroclaw on PATH)")
    p.add_argument("--timeout", type=float_in(0.0, MAX_SECONDS, open_low=True),
                   metavar="S", help="stop the agent after S seconds (exit 124)")
    s = p.add_argument_group("a started server")
    s.add_argument("--port", type=int_in(1, 65535), help="use the server already "
                   "answering on 127.0.0.1:PORT, else start one on this port "
                   "(default: a free port)")
    s.add_argument("--startup-timeout", type=float_in(0.0, MAX_SECONDS, open_low=True),
                   default=600.0, metavar="S",
                   help="wait at most S seconds for the server to be ready")
    s.add_argument("--keep-server", action="store_true", help="leave a started server "
                   "running after the task (needs --api-key-file: its key)")
    s.add_argument("--served-model-name", metavar="NAME",
                   help="the model's name on the server (perspective-serve's flag)")
    s.add_argument("--server-log", metavar="FILE",
                   help="write the started server's output here")
    s.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for perspective-serve, e.g. "
                        "--serve-arg=--flag=value (repeatable)")
    return p


@cli_entry
def run(argv=None) -> int:
    a = _parser().parse_args(argv)
    if not a.swarm_task.strip():
        raise UserError("--swarm-task is empty; give the task for the agent")
    if a.url and (a.port is not None or a.keep_server or a.served_model_name
                  or a.server_log or a.serve_arg):
        raise UserError("--port, --keep-server, --served-model-name, --server-log and "
                        "--serve-arg are for a server perspective-agent starts; drop "
                        "them with --url")
    exe = zeroclaw.find_zeroclaw(a.zeroclaw)            # before any server is started
    user_key = _read_key(a.api_key_file) if a.api_key_file else None
    if a.keep_server and not a.api_key_file:
        raise UserError("--keep-server needs --api-key-file FILE: the key to reach the "
                        "server afterwards")
    if a.model_dir and not os.path.isdir(a.model_dir):
        raise UserError(f"--model-dir {a.model_dir} is not a directory")
    if a.server_log:
        check_output_file(a.server_log, "--server-log")

    private = tempfile.mkdtemp(prefix="perspective-agent-")      # mode 0700
    server: list = []
    status = None
    try:
        with _interrupt_on_termination():
            root, key = _server(a, private, user_key, server)
            model = local_server.model_id(root, key)
            zeroclaw.write_config(private, root, model, key)
            env = zeroclaw.agent_env(dict(os.environ), private, root, model)
            status = zeroclaw.run_agent(exe, a.swarm_task, env, a.timeout)
    finally:
        with _signals_ignored():
            if server and (status is None or not a.keep_server):
                server[0].stop()
            elif server:
                print(f"{PREFIX}perspective-serve keeps running at {server[0].root} "
                      f"(pid {server[0].proc.pid}, log {server[0].log_path})",
                      file=sys.stderr)
            shutil.rmtree(private, ignore_errors=True)
    return status


def _server(a, private: str, user_key: Optional[str], started: list) -> tuple:
    """(API root, key) of the server to use: --url's, one answering on --port, or a
    new one (appended to `started` before it is waited for, so it is always stopped)."""
    if a.url:
        root = local_server.api_root(a.url)
        _check_answers(root, "--url")
        local_server.wait_ready(root, a.startup_timeout)
        return root, user_key
    if a.port is not None:
        root = f"http://{local_server.LOOPBACK}:{a.port}"
        if local_server.health(root) is not None:
            _check_answers(root, "--port")
            unused = " (--model-dir not used)" if a.model_dir else ""
            print(f"{PREFIX}using the server already running at {root}{unused}",
                  file=sys.stderr)
            local_server.wait_ready(root, a.startup_timeout)
            return root, user_key
    if not a.model_dir:
        raise UserError("give --model-dir M to start perspective-serve, or --url URL of "
                        "a running one")
    if a.api_key_file:
        key, key_file = user_key, a.api_key_file
    else:
        key, key_file = secrets.token_urlsafe(32), os.path.join(private, KEY_FILE)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key)
    log = a.server_log or (_kept_log() if a.keep_server else os.path.join(private, SERVE_LOG))
    extra = (["--served-model-name", a.served_model_name] if a.served_model_name else [])
    port = a.port if a.port is not None else local_server.free_port()
    with signals_deferred():        # recorded before anything can interrupt
        server = local_server.LocalServer(a.model_dir, port, key_file, log,
                                          tuple(extra + a.serve_arg))
        started.append(server)
    print(f"{PREFIX}starting perspective-serve on {server.root} (model {a.model_dir})",
          file=sys.stderr)
    local_server.wait_ready(server.root, a.startup_timeout, server)
    return server.root, key


def _check_answers(root: str, flag: str) -> None:
    """Something that answers /health with neither 200 nor 503 is not perspective-serve."""
    status = local_server.health(root)
    if status is None:
        raise UserError(f"{flag}: nothing answers at {root}; start perspective-serve "
                        "there first")
    if status not in (200, 503):
        raise UserError(f"{flag}: {root}/health answered HTTP {status}; is it "
                        "perspective-serve?")


def _read_key(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            key = fh.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--api-key-file {path}: cannot read it "
                        f"({getattr(e, 'strerror', None) or e})") from None
    if not key or any(c.isspace() for c in key):
        raise UserError(f"--api-key-file {path}: holds no key (one line, no spaces)")
    return key


def _kept_log() -> str:
    fd, path = tempfile.mkstemp(prefix="perspective-serve-", suffix=".log")
    os.close(fd)
    return path


TERMINATING = (signal.SIGTERM, signal.SIGHUP)


def _raise_interrupt(_signum, _frame):
    raise KeyboardInterrupt


def _interrupt_on_termination():
    """SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does, so the children
    are stopped on the way out."""
    return signals_handled(TERMINATING, _raise_interrupt)


def _signals_ignored():
    """No signal interrupts the clean-up (it is bounded: SIGKILL after a grace)."""
    return signals_handled((signal.SIGINT, *TERMINATING), signal.SIG_IGN)


main = exit_with(run)

if __name__ == "__main__":
    main()
