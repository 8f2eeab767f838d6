"""perspective-serve: an OpenAI-compatible server over a model directory, with
continuous batching on the streaming engine.

    perspective-serve --model-dir models/tiny                  # http://127.0.0.1:8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "tiny", "prompt": "def main(", "max_tokens": 32}'

Binds loopback by default. A non-loopback --host needs --api-key/--api-key-file
(or --allow-unauthenticated-public). Endpoints, fields and extensions: docs/serving.md.
"""

from __future__ import annotations

import ipaddress
import os
import sys

from perspective_jax.cli import compile_cache
from perspective_jax.cli.common import (OneLineParser, add_adapter_flags, add_engine_flags,
                                        add_memory_flags, add_mpd_flags, cli_entry,
                                        engine_options_from_args, exit_with, int_in,
                                        megabytes, mpd_from_args, recall_config_from_args)
from perspective_jax.errors import UserError
from perspective_jax.model import footprint


def _parser() -> OneLineParser:
    p = OneLineParser(prog="perspective-serve", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True, help="directory written by perspective-export")
    n = p.add_argument_group("network and access")
    n.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    n.add_argument("--port", type=int_in(0, 65535), default=8000)
    n.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (all but /health)")
    n.add_argument("--api-key-file", metavar="FILE", help="read the key from this file")
    n.add_argument("--allow-unauthenticated-public", action="store_true",
                   help="allow a non-loopback --host without an API key")
    n.add_argument("--served-model-name", default=None,
                   help="model id clients use (default: the model directory's name)")
    lim = p.add_argument_group("batching and limits")
    lim.add_argument("--max-batch", type=int_in(1, 1024), default=16,
                     help="sequences decoded together")
    lim.add_argument("--max-queue", type=int_in(1), default=64,
                     help="requests waiting to start; more answer 429")
    lim.add_argument("--max-prompt-tokens", type=int_in(1), default=8192)
    lim.add_argument("--max-tokens-limit", type=int_in(1), default=2048,
                     help="most tokens one choice may generate")
    lim.add_argument("--default-max-tokens", type=int_in(1), default=256,
                     help="chat completions' max_tokens when the request has none")
    lim.add_argument("--max-request-mb", type=megabytes, default=1.0,
                     help="largest request body")
    add_engine_flags(p)
    add_mpd_flags(p, switch=False)
    add_memory_flags(p)
    add_adapter_flags(p, use="requests decode with them unless they set "
                             "perspective.adapter to false")
    p.add_argument("--safety", action="store_true",
                   help="project every request's tokens onto the model's safety polytope "
                        "(enforced: requests cannot turn it off; without this flag a "
                        "request may ask for it with perspective.safety)")
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))
    compile_cache.add_flag(p)
    p.add_argument("--allow-oversize", action="store_true", help=footprint.OVERRIDE_HELP)
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key(a) -> str | None:
    if a.api_key and a.api_key_file:
        raise UserError("give --api-key or --api-key-file, not both")
    if a.api_key_file:
        try:
            with open(a.api_key_file, encoding="utf-8") as fh:
                key = fh.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--api-key-file {a.api_key_file}: cannot read it "
                            f"({getattr(exc, 'strerror', None) or exc})") from None
        if not key:
            raise UserError(f"--api-key-file {a.api_key_file} is empty")
        return key
    if a.api_key is not None and not a.api_key.strip():
        raise UserError("--api-key is empty")
    return a.api_key


@cli_entry
def run(argv=None) -> int:
    a = _parser().parse_args(argv)
    key = api_key(a)
    if not is_loopback(a.host) and key is None and not a.allow_unauthenticated_public:
        raise UserError(f"--host {a.host} is not a loopback address: anyone who can reach it "
                        "could use the model; set --api-key/--api-key-file, or pass "
                        "--allow-unauthenticated-public")
    from perspective_jax.modeldir.manifest import read_manifest
    from perspective_jax.serve.app import ServeOptions
    from perspective_jax.serve.protocol import Limits
    from perspective_jax.serve.server import bind, build_server
    manifest = read_manifest(a.model_dir)
    footprint.refuse_oversize_engine(manifest, a.host_budget_mb, a.device_slots,
                                     a.prefill_chunk, a.allow_oversize)
    name = a.served_model_name or os.path.basename(os.path.normpath(a.model_dir))
    opts = ServeOptions(model_name=name, api_key=key,
                        limits=Limits(max_tokens=a.max_tokens_limit,
                                      default_max_tokens=min(a.default_max_tokens,
                                                             a.max_tokens_limit),
                                      max_n=a.max_batch),
                        max_prompt_tokens=a.max_prompt_tokens,
                        max_request_bytes=int(a.max_request_mb * 2**20))
    compile_cache.enable(a.compilation_cache)
    server = build_server(a.model_dir, engine_options_from_args(a), opts, a.max_batch,
                          a.max_queue, mpd_from_args(a), safety=a.safety, memory=a.memory,
                          recall=recall_config_from_args(a), adapter=a.adapter)
    sock = bind(a.host, a.port)
    import uvicorn
    url = f"http://{a.host}:{sock.getsockname()[1]}"
    adapter = f", adapter {a.adapter}" if a.adapter else ""
    print(f"perspective-serve: {url}/v1 serving {name!r} (chat template: "
          f"{server.template_source}{adapter}); loading the model — GET /health says when it is "
          "ready", file=sys.stderr, flush=True)
    server.scheduler.start()
    uv = uvicorn.Server(uvicorn.Config(server.app, log_level=a.log_level, lifespan="off"))
    try:
        uv.run(sockets=[sock])
    finally:
        server.scheduler.stop()
        sock.close()
    if server.scheduler.load_error:
        raise UserError(f"the model failed to load: {server.scheduler.load_error}")
    return 0


main = exit_with(run)

if __name__ == "__main__":
    main()
