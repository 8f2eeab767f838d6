"""Servers for the serve tests: the small exported model behind perspective-serve's
app on a loopback port (uvicorn on a thread), and a client for it."""

import contextlib

from perspective_jax.infer.options import EngineOptions
from perspective_jax.serve.app import ServeOptions
from perspective_jax.serve.server import RunningServer, build_server

MODEL = "tiny"
TIMEOUT_S = 60          # any one request


@contextlib.contextmanager
def running(model_dir, opts: ServeOptions = ServeOptions(model_name=MODEL), **kw):
    """A live server on 127.0.0.1 (a free port), stopped afterwards."""
    server = RunningServer(build_server(model_dir, EngineOptions(host_budget_mb=1), opts,
                                        **kw)).start(ready_timeout=120)
    try:
        yield server
    finally:
        server.stop()


def client(server, key: str = "unused", **kw):
    import openai
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, timeout=TIMEOUT_S,
                         max_retries=0, **kw)

