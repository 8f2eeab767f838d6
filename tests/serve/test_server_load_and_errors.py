"""perspective-serve under load and misuse: 16 concurrent streams each equal to
their solo output, a disconnect freeing its place at once, a full queue answered
429, loading answered 503, and every bad request an OpenAI-shaped error with the
documented status. Tool calls end to end on a scripted engine."""

import contextlib
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from perspective_jax.cli import serve as serve_cli
from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.state import Batch, EngineState
from perspective_jax.serve.app import ServeOptions
from perspective_jax.serve.protocol import Limits
from serve_helpers import MODEL, client, running

N_CLIENTS = 16


def _tokens(choice) -> tuple:
    return tuple(choice.logprobs.tokens)


def test_sixteen_concurrent_streams_each_equal_their_solo_output(served):
    server, _ = served
    c = client(server)
    prompts = [f"x{i} = {i * 7} + " for i in range(N_CLIENTS)]
    solo = [_tokens(c.completions.create(model=MODEL, prompt=p, max_tokens=12,
                                         temperature=0, logprobs=0).choices[0])
            for p in prompts]
    got, errors = [None] * N_CLIENTS, []

    def one(i):
        try:
            toks = []
            for chunk in client(server).completions.create(
                    model=MODEL, prompt=prompts[i], max_tokens=12, temperature=0,
                    logprobs=0, stream=True):
                for ch in chunk.choices:
                    if ch.logprobs:
                        toks += ch.logprobs.tokens
            got[i] = tuple(toks)
        except Exception as exc:                    # noqa: BLE001 — collected
            errors.append(exc)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(N_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and all(not t.is_alive() for t in threads)
    assert got == solo
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    steps = [ln for ln in metrics.splitlines()
             if ln.startswith("perspective_time_per_output_token_seconds_count")]
    # batched: far fewer steps than the 16 × 11 tokens decoded after the first
    assert float(steps[0].split()[-1]) < 16 * 11 + 16 * 12


class _HeldSteps(StreamingEngine):
    """A StreamingEngine whose batched steps wait for `go` (a long-running request that
    cannot end by itself while the test fills the queue)."""

    go = threading.Event()

    def step(self, *a, **kw):
        assert self.go.wait(60)
        return super().step(*a, **kw)


def test_a_disconnect_frees_its_place_and_a_full_queue_is_429(exported):
    from perspective_jax.serve.server import RunningServer, build_server
    _, _, path = exported
    _HeldSteps.go.clear()
    server = RunningServer(build_server(path, opts=ServeOptions(model_name=MODEL),
                                        max_batch=1, max_queue=1,
                                        engine_factory=_HeldSteps)).start()
    sched = server.server.scheduler
    try:
        long = {"model": MODEL, "prompt": "a", "max_tokens": 2000, "stream": True,
                "logprobs": 0}                      # every token is a chunk
        with httpx.stream("POST", server.url + "/v1/completions", json=long,
                          timeout=60) as resp:
            it = resp.iter_lines()
            next(l for l in it if l.startswith("data: "))          # it is running
            queued = threading.Thread(target=httpx.post, args=(
                server.url + "/v1/completions",),
                kwargs={"json": {"model": MODEL, "prompt": "b", "max_tokens": 2},
                        "timeout": 60})
            queued.start()
            deadline = time.monotonic() + 30
            while sched.queue_depth < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            full = httpx.post(server.url + "/v1/completions", timeout=30,
                              json={"model": MODEL, "prompt": "c", "max_tokens": 2})
            assert full.status_code == 429
            assert full.json()["error"]["type"] == "rate_limit_error"
            assert full.json()["error"]["code"] == "queue_full"
            assert sched.running_sequences == 1
        # the stream is closed: its sequence leaves after the step under way, and the
        # queued request runs at once (far before the 2000 tokens would have ended)
        _HeldSteps.go.set()
        t0 = time.monotonic()
        queued.join(60)
        assert not queued.is_alive() and time.monotonic() - t0 < 30
        deadline = time.monotonic() + 10
        while sched.running_sequences and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sched.running_sequences == 0 and sched.queue_depth == 0
        r = client(server).completions.create(model=MODEL, prompt="d", max_tokens=3)
        assert r.usage.completion_tokens == 3
    finally:
        _HeldSteps.go.set()
        server.stop()


def _error(resp, status, param=None, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if code:
        assert err["code"] == code
    return err


def test_bad_requests_get_openai_shaped_errors(exported):
    _, _, path = exported
    opts = ServeOptions(model_name=MODEL, api_key="sekrit", max_prompt_tokens=64,
                        max_request_bytes=4096, limits=Limits(max_tokens=100))
    with running(path, opts) as server:
        ok = {"Authorization": "Bearer sekrit"}
        url = server.url
        post = lambda p, **kw: httpx.post(url + p, timeout=30, **kw)   # noqa: E731
        good = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        assert httpx.get(url + "/health", timeout=30).status_code == 200   # no key
        _error(post("/v1/completions", json=good), 401, code="invalid_api_key")
        _error(post("/v1/completions", json=good,
                    headers={"Authorization": "Bearer wrong"}), 401)
        _error(httpx.get(url + "/v1/models", timeout=30), 401)
        assert post("/v1/completions", json=good, headers=ok).status_code == 200
        _error(post("/v1/completions", content=b"{not json", headers=ok), 400,
               code="invalid_json")
        _error(post("/v1/completions", json=[1, 2], headers=ok), 400)
        for field, value in (("max_tokens", "ten"), ("max_tokens", 101),
                             ("temperature", -1), ("top_p", 0), ("n", 0), ("stop", 5),
                             ("seed", 1.5), ("logprobs", 99), ("stream", "yes"),
                             ("presence_penalty", 0.5), ("prompt", []),
                             ("prompt", [1, 10 ** 6]), ("perspective", {"bogus": 1})):
            _error(post("/v1/completions", json={**good, field: value}, headers=ok), 400,
                   param=field)
        _error(post("/v1/completions", json={**good, "model": "gpt-4"}, headers=ok), 404,
               param="model", code="model_not_found")
        _error(post("/v1/completions", json={**good, "prompt": "x" * 100}, headers=ok),
               413, param="prompt", code="context_length_exceeded")
        _error(post("/v1/completions", json={**good, "prompt": "x" * 5000}, headers=ok),
               413, code="request_too_large")
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        _error(post("/v1/chat/completions", json={**chat, "messages": []}, headers=ok),
               400, param="messages")
        _error(post("/v1/chat/completions",
                    json={**chat, "messages": [{"role": "wizard", "content": "x"}]},
                    headers=ok), 400, param="messages[0].role")
        _error(post("/v1/chat/completions", json={**chat, "tools": [{"type": "x"}]},
                    headers=ok), 400, param="tools[0]")
        _error(post("/v1/nothing", json={}, headers=ok), 404)
        _error(httpx.get(url + "/v1/completions", headers=ok, timeout=30), 405)
        # the official client raises its own typed errors for these statuses
        c = client(server, key="sekrit")
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="nope", prompt="x", max_tokens=1)
        with pytest.raises(openai.AuthenticationError):
            client(server, key="bad").models.list()
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model=MODEL, prompt="x", max_tokens=0)


class _GatedEngine(StreamingEngine):
    """A StreamingEngine whose construction waits for `gate` (a slow load)."""

    gate = threading.Event()

    def __init__(self, *a, **kw):
        assert self.gate.wait(60)
        super().__init__(*a, **kw)


def test_health_is_503_while_loading_then_200(exported):
    from perspective_jax.serve.server import RunningServer, build_server
    _, _, path = exported
    _GatedEngine.gate.clear()
    server = RunningServer(build_server(path, opts=ServeOptions(model_name=MODEL),
                                        engine_factory=_GatedEngine)).start(ready_timeout=None)
    try:
        deadline = time.monotonic() + 30
        while not server.uvicorn.started and time.monotonic() < deadline:
            time.sleep(0.02)
        err = _error(httpx.get(server.url + "/health", timeout=30), 503, code="loading")
        assert err["type"] == "service_unavailable"
        _error(httpx.post(server.url + "/v1/completions", timeout=30,
                          json={"model": MODEL, "prompt": "x", "max_tokens": 1}), 503)
        _GatedEngine.gate.set()
        assert server.server.scheduler.ready.wait(60)
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    finally:
        _GatedEngine.gate.set()
        server.stop()


class _ScriptedEngine:
    """Greedy logits that spell `script` (byte ids), whatever is fed: a model whose
    output is known, for tool calls end to end."""

    routed, stats = False, None
    script = ('Let me look.<tool_call>{"name": "get_weather", "arguments": '
              '{"city": "Paris"}}</tool_call>\x00')

    def __init__(self, *a, **kw):
        from perspective_jax.infer.stats import Stats
        self.stats = Stats()

    def new_state(self):
        return EngineState((), 0)                        # position = characters spelt

    def _logits(self, k):
        z = np.zeros(259, np.float32)
        ch = self.script.encode()[min(k, len(self.script) - 1)]
        z[258 if ch == 0 else ch] = 50.0                 # NUL in the script: EOS
        return z

    def forward(self, tokens, state, ext=None, all_logits=False):
        return self._logits(0), EngineState((), 1)

    def step_batch(self, batch, tokens, ext=None):
        return (np.stack([self._logits(k) for k in batch.next_pos]),
                Batch((), batch.next_pos + 1))

    def close(self):
        pass


def test_tool_calls_come_back_whole_and_streamed(exported):
    from perspective_jax.serve.server import RunningServer, build_server
    _, _, path = exported
    server = RunningServer(build_server(path, opts=ServeOptions(model_name=MODEL),
                                        engine_factory=_ScriptedEngine)).start()
    tools = [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}}}}}]
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    try:
        c = client(server)
        r = c.chat.completions.create(model=MODEL, messages=msgs, tools=tools,
                                      max_tokens=200)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "Let me look."
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        assert call.function.arguments == '{"city": "Paris"}'
        chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, tools=tools,
                                                max_tokens=200, stream=True))
        deltas = [ch.delta for k in chunks for ch in k.choices]
        assert "".join(d.content or "" for d in deltas) == "Let me look."
        calls = [tc for d in deltas for tc in d.tool_calls or ()]
        assert [(tc.index, tc.function.name, tc.function.arguments) for tc in calls] == \
            [(0, "get_weather", '{"city": "Paris"}')]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        # tool_choice "none": no tools in the prompt, the block stays text
        plain = c.chat.completions.create(model=MODEL, messages=msgs, tools=tools,
                                          tool_choice="none", max_tokens=200)
        assert plain.choices[0].message.tool_calls is None
        assert "<tool_call>" in plain.choices[0].message.content
    finally:
        server.stop()


def test_the_cli_refuses_unsafe_or_impossible_setups(exported, tmp_path, capsys):
    _, _, path = exported
    base = ["--model-dir", path]
    empty = tmp_path / "key"
    empty.write_text("\n")

    def refused(argv, message):
        assert serve_cli.run(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    refused(base + ["--host", "0.0.0.0"], "not a loopback address")
    refused(base + ["--api-key-file", str(empty)], "is empty")
    refused(base + ["--api-key-file", str(tmp_path / "missing")], "cannot read")
    refused(["--model-dir", str(tmp_path / "nope")], "does not exist")
    refused(base + ["--port", "70000"], "--port")
    import socket
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        refused(base + ["--port", str(port), "--log-level", "error"],
                f"cannot listen on 127.0.0.1:{port}")


class _FailsOnce(StreamingEngine):
    """A StreamingEngine whose first batched step fails (an unreadable expert, say)."""

    failed = False

    def step_batch(self, *a, **kw):
        if not _FailsOnce.failed:
            _FailsOnce.failed = True
            raise OSError("expert region unreadable")
        return super().step_batch(*a, **kw)


def test_an_engine_failure_fails_its_requests_and_the_server_goes_on(exported):
    from perspective_jax.serve.server import RunningServer, build_server
    _, _, path = exported
    _FailsOnce.failed = False
    server = RunningServer(build_server(path, opts=ServeOptions(model_name=MODEL),
                                        engine_factory=_FailsOnce)).start()
    try:
        body = {"model": MODEL, "prompt": "abc", "max_tokens": 4}
        err = _error(httpx.post(server.url + "/v1/completions", json=body, timeout=60), 500)
        assert "expert region unreadable" in err["message"] and err["type"] == "server_error"
        assert httpx.post(server.url + "/v1/completions", json=body,
                          timeout=60).json()["usage"]["completion_tokens"] == 4
    finally:
        server.stop()
