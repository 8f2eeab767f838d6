"""Putting a server together, and running it on a socket.

    server = build_server(model_dir, EngineOptions(), ServeOptions(), max_batch=16)
    running = RunningServer(server, host="127.0.0.1", port=0).start()   # tests, tools
    running.url          # "http://127.0.0.1:PORT";  running.stop()

`build_server` reads the manifest, the tokenizer and the chat template at once (bad
files are one-line errors before anything listens); the engine itself loads on the
scheduler's thread, while `/health` answers 503. `perspective-serve` runs the same
server in the foreground (`cli.serve`).
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from typing import Optional

from perspective_jax.adapt.adapter_file import load_adapters
from perspective_jax.config.schema import MPDConfig
from perspective_jax.errors import UserError
from perspective_jax.infer.engine import StreamingEngine, load_model_tokenizer
from perspective_jax.infer.memory_codec import check_model, engine_recall
from perspective_jax.infer.options import EngineOptions
from perspective_jax.infer.safety_guard import model_polytope
from perspective_jax.memory.memory_file import load as load_memory
from perspective_jax.memory.recall import RecallConfig
from perspective_jax.modeldir.chat_template import read_chat_template
from perspective_jax.modeldir.manifest import model_identity, read_manifest
from perspective_jax.serve.adapter import ServedAdapter
from perspective_jax.serve.app import ServeOptions, create_app
from perspective_jax.serve.chat import ChatTemplate
from perspective_jax.serve.metrics import ServerMetrics
from perspective_jax.serve.scheduler import Scheduler


@dataclasses.dataclass
class Server:
    app: object
    scheduler: Scheduler
    template_source: str


def build_server(model_dir: str, engine_options: EngineOptions = EngineOptions(),
                 opts: ServeOptions = ServeOptions(), max_batch: int = 16,
                 max_queue: int = 64, mpd: MPDConfig = MPDConfig(),
                 engine_factory=None, safety: bool = False, memory: Optional[str] = None,
                 recall: RecallConfig = RecallConfig(), adapter: Optional[str] = None
                 ) -> Server:
    """The app and its scheduler (not started). `engine_factory(model_dir, options,
    manifest)` makes the engine (default: StreamingEngine). The model directory's
    safety polytope, when it has one, lets requests ask for the projection
    (`perspective.safety`); `safety=True` applies it to every request (and needs one).
    `memory`: a memory file of this model, consulted by requests that ask for it
    (`perspective.memory` with `perspective.mpd`), re-read when a writer replaces it.
    `adapter`: an adapter file of this model (perspective-adapt), attached when the
    engine loads; requests decode with it unless they ask `perspective.adapter: false`
    (`serve.adapter`)."""
    manifest = read_manifest(model_dir)
    tokenizer = load_model_tokenizer(model_dir, manifest)
    polytope = model_polytope(model_dir, manifest, required=safety)
    mode = "enforced" if safety else "optional" if polytope is not None else "unavailable"
    if memory is not None:                      # one-line errors before the model loads
        check_model(load_memory(memory), model_identity(manifest), memory)
    if adapter is not None:
        load_adapters(adapter, model_identity(manifest), manifest.config)
    opts = dataclasses.replace(opts, limits=dataclasses.replace(
        opts.limits, safety=mode, memory=memory is not None, adapter=adapter is not None))
    text, source = read_chat_template(model_dir, manifest)
    template = ChatTemplate(text, where=f"{model_dir}: chat template")
    make = engine_factory or StreamingEngine

    def load():
        return make(model_dir, engine_options, manifest=manifest), tokenizer
    scheduler = Scheduler(load, max_batch=max_batch, max_queue=max_queue, mpd=mpd,
                          polytope=polytope,
                          memory=None if memory is None else (
                              lambda engine, tok: engine_recall(engine, tok, memory, recall)),
                          adapter=None if adapter is None else (
                              lambda engine: ServedAdapter.attach(engine, adapter)))
    metrics = ServerMetrics(lambda: scheduler)
    scheduler.metrics = metrics
    app = create_app(opts, scheduler, tokenizer, template, metrics)
    return Server(app, scheduler, source)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (one-line error when it cannot be had)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class RunningServer:
    """`server` on a background thread (uvicorn), for tests, benchmarks and agents."""

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning"):
        import uvicorn
        self.server, self.sock = server, bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.uvicorn = uvicorn.Server(uvicorn.Config(server.app, log_level=log_level,
                                                     lifespan="off", timeout_keep_alive=5))
        self.thread = threading.Thread(target=self.uvicorn.run,
                                       kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, ready_timeout: Optional[float] = 300.0) -> "RunningServer":
        """Start the scheduler and the HTTP server; wait (bounded) until the model is
        loaded unless `ready_timeout` is None."""
        self.server.scheduler.start()
        self.thread.start()
        if ready_timeout is not None:
            deadline = time.monotonic() + ready_timeout
            while not self.server.scheduler.ready.wait(0.1):
                if self.server.scheduler.load_error or time.monotonic() > deadline:
                    self.stop()
                    raise UserError(f"the model did not load: "
                                    f"{self.server.scheduler.load_error or 'timed out'}")
            while not self.uvicorn.started and time.monotonic() < deadline:
                time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout)
        self.server.scheduler.stop(timeout)
        self.sock.close()
