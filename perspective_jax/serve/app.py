"""The HTTP application: OpenAI's endpoints over the continuous-batching scheduler.

    app = create_app(ServeOptions(model_name="tiny"), scheduler, tokenizer, template)

GET /health (no key; 503 while loading; with the attached adapter's path, rank,
targets, scale when the server has one), GET /v1/models, POST /v1/completions,
POST /v1/chat/completions, POST /tokenize, POST /detokenize, GET /tokenizer_info,
GET /metrics (Prometheus). Every other endpoint needs `Authorization: Bearer KEY`
when the server has a key. Errors are OpenAI-shaped (`serve.api_errors`); a body
over `max_request_bytes` or a prompt over `max_prompt_tokens` is 413; a full queue
429. A client that goes away is cancelled: its sequences leave the batch before
the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from perspective_jax.errors import UserError
from perspective_jax.serve import responses as R
from perspective_jax.serve import tokens as T
from perspective_jax.serve.api_errors import APIError, bad_field
from perspective_jax.serve.chat import ChatTemplate, ChatTemplateError
from perspective_jax.serve.metrics import ServerMetrics
from perspective_jax.serve.protocol import Limits, chat_request, completion_request
from perspective_jax.serve.jobs import Done, Failed, Job
from perspective_jax.serve.scheduler import Scheduler

DISCONNECT_POLL_S = 0.5
ENDPOINTS = ("/health", "/v1/models", "/v1/completions", "/v1/chat/completions",
             "/tokenize", "/detokenize", "/tokenizer_info", "/metrics")
# end-of-turn markers of chat templates: generation stops there
TURN_MARKERS = ("<|im_end|>", "<|im_start|>", "<|eot_id|>", "<|end|>")


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    model_name: str = "perspective"
    api_key: Optional[str] = None
    limits: Limits = Limits()
    max_prompt_tokens: int = 8192
    max_request_bytes: int = 1 << 20

    def __post_init__(self):
        if not self.model_name:
            raise UserError("--served-model-name must not be empty")
        if self.max_prompt_tokens < 1 or self.max_request_bytes < 1:
            raise UserError("prompt and request limits must be >= 1")


def create_app(opts: ServeOptions, scheduler: Scheduler, tokenizer, template: ChatTemplate,
               metrics: Optional[ServerMetrics] = None) -> FastAPI:
    app = FastAPI(title="perspective-serve", docs_url=None, redoc_url=None,
                  openapi_url=None)
    metrics = metrics or ServerMetrics(lambda: scheduler)
    limits = dataclasses.replace(opts.limits, vocab_size=tokenizer.vocab_size)
    specials = T.special_tokens(tokenizer)
    eos_text = T.special_text(tokenizer, getattr(tokenizer, "eos_id", -1)) or ""
    bos_text = ""           # documents are joined by EOS in training: no BOS is ever seen
    chat_stops = tuple(m for m in TURN_MARKERS if m in template.text)
    app.state.scheduler, app.state.metrics = scheduler, metrics

    # ------------------------------------------------------------ errors, auth, metrics
    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        msg = {404: "no such endpoint", 405: "method not allowed on this endpoint"}
        return JSONResponse(APIError(exc.status_code, msg.get(exc.status_code, str(exc.detail)),
                                     code="not_found" if exc.status_code == 404 else None).body(),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_, exc: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}").body(),
                            status_code=500)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        endpoint = path if path in ENDPOINTS or path.startswith("/v1/models") else "other"
        endpoint = "/v1/models" if endpoint.startswith("/v1/models") else endpoint
        if opts.api_key is not None and path != "/health" and not _key_ok(request, opts.api_key):
            err = APIError(401, "incorrect or missing API key (send Authorization: Bearer "
                                "KEY)", code="invalid_api_key")
            response = JSONResponse(err.body(), status_code=401)
        else:
            try:
                response = await call_next(request)
            except APIError as exc:                     # raised below a streaming response
                response = JSONResponse(exc.body(), status_code=exc.status)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    # ------------------------------------------------------------ plain endpoints
    @app.get("/health")
    async def health():
        if scheduler.load_error is not None:
            raise APIError(503, f"the model failed to load: {scheduler.load_error}")
        if not scheduler.ready.is_set():
            raise APIError(503, "the model is loading", code="loading")
        served = scheduler.served
        return {"status": "ok"} if served is None else {"status": "ok",
                                                        "adapter": served.info()}

    def model_card() -> dict:
        return {"id": opts.model_name, "object": "model", "created": int(time.time()),
                "owned_by": "perspective", "max_model_len": opts.max_prompt_tokens}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model(model_id)
        return model_card()

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return {"tokenizer_class": type(tokenizer).__name__, "eos_token": eos_text or None,
                "bos_token": bos_text or None,
                "pad_token": next((s for s, i in specials.items() if "pad" in s), None),
                "chat_template": template.text, "model_max_length": opts.max_prompt_tokens,
                "vocab_size": tokenizer.vocab_size}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await _body(request)
        if "messages" in body:
            text = _render_chat(body)
        else:
            text = body.get("prompt")
            if not isinstance(text, str):
                raise bad_field("prompt", "required: the text to tokenize")
        ids = T.encode(tokenizer, text)
        return {"tokens": ids, "count": len(ids), "max_model_len": opts.max_prompt_tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await _body(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool)
                and 0 <= i < tokenizer.vocab_size for i in ids):
            raise bad_field("tokens", f"must be a list of token ids in [0, "
                                      f"{tokenizer.vocab_size})")
        return {"prompt": T.decode(tokenizer, ids)}

    # ------------------------------------------------------------ generation
    @app.post("/v1/completions")
    async def completions(request: Request):
        req = completion_request(await _body(request), limits)
        _check_model(req.model)
        prompts = [list(p) if isinstance(p, tuple) else T.encode(tokenizer, p)
                   for p in req.prompts]
        _check_length(prompts, "prompt")
        texts = [T.decode(tokenizer, p) if isinstance(q, tuple) else q
                 for p, q in zip(prompts, req.prompts)]
        job, queue = _submit(prompts, req.decoding)
        rid = R.new_id("cmpl")
        if req.stream:
            return _stream(request, job, queue, R.CompletionChunks(
                rid, opts.model_name, req, tokenizer, texts), [])
        out = await _collect(request, job, queue, len(prompts) * req.decoding.n)
        return R.completion_body(rid, opts.model_name, int(time.time()), req, out,
                                 tokenizer, texts)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = chat_request(await _body(request), limits)
        _check_model(req.model)
        tools_on = req.tools is not None and req.tool_choice != "none"
        text = _render(list(req.messages), req.tools if tools_on else None, req.tool_choice)
        prompt = T.encode(tokenizer, text)
        _check_length([prompt], "messages")
        decoding = dataclasses.replace(req.decoding,
                                       stop=tuple(dict.fromkeys(req.decoding.stop + chat_stops)))
        job, queue = _submit([prompt], decoding)
        rid = R.new_id("chatcmpl")
        if req.stream:
            chunks = R.ChatChunks(rid, opts.model_name, req, tokenizer, tools_on)
            return _stream(request, job, queue, chunks, chunks.start())
        out = await _collect(request, job, queue, req.decoding.n)
        return R.chat_body(rid, opts.model_name, int(time.time()), req, out, tokenizer,
                           tools_on)

    # ------------------------------------------------------------ helpers
    def _check_model(name: str) -> None:
        if name != opts.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{opts.model_name!r}", param="model", code="model_not_found")

    def _check_length(prompts: list, param: str) -> None:
        longest = max(len(p) for p in prompts)
        if longest > opts.max_prompt_tokens:
            raise APIError(413, f"the prompt has {longest} tokens, more than this server "
                                f"allows ({opts.max_prompt_tokens}, --max-prompt-tokens)",
                           param=param, code="context_length_exceeded")

    def _render(messages: list, tools, tool_choice) -> str:
        try:
            return template.render(messages, tools=list(tools) if tools else None,
                                   tool_choice=tool_choice, add_generation_prompt=True,
                                   bos_token=bos_text, eos_token=eos_text)
        except ChatTemplateError as exc:
            raise APIError(400, f"the chat template failed on these messages: {exc}",
                           param="messages") from None

    def _render_chat(body: dict) -> str:
        req = chat_request({**body, "model": opts.model_name}, limits)
        return _render(list(req.messages), req.tools, req.tool_choice)

    async def _body(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > opts.max_request_bytes:
            raise _too_large(int(declared))
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > opts.max_request_bytes:
                raise _too_large(len(data))
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the body is not valid JSON ({exc})",
                           code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def _too_large(size: int) -> APIError:
        return APIError(413, f"the request body has {size} bytes, more than this server "
                             f"accepts ({opts.max_request_bytes}, --max-request-mb)",
                        code="request_too_large")

    def _submit(prompts: list, decoding):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(ev) -> None:                              # from the scheduler thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:                           # the loop is gone (shutdown)
                job.cancel()
        job = Job(prompts, decoding, emit)
        scheduler.submit(job)
        metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        return job, queue

    async def _collect(request: Request, job: Job, queue: asyncio.Queue, n: int):
        out = R.Collected(n)
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        raise APIError(499, "the client closed the connection")
                    continue
                if isinstance(ev, Failed):
                    raise ev.error
                out.add(ev)
                if isinstance(ev, Done):
                    metrics.generation_tokens.inc(ev.completion_tokens)
                    return out
        finally:
            job.cancel()                                   # no-op once it is done

    def _stream(request: Request, job: Job, queue: asyncio.Queue, chunks, first: list):
        async def events():
            try:
                for payload in first:
                    yield R.sse(payload)
                while True:
                    ev = await queue.get()
                    if isinstance(ev, Failed):
                        yield R.sse(ev.error.body())
                        break
                    for payload in chunks.on(ev):
                        yield R.sse(payload)
                    if isinstance(ev, Done):
                        metrics.generation_tokens.inc(ev.completion_tokens)
                        break
                yield b"data: [DONE]\n\n"
            finally:
                job.cancel()                               # the client left, or done
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return app


def _key_ok(request: Request, key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                              key.encode())
