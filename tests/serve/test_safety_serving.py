"""The safety projection on perspective-serve: `perspective.safety` per request (400
naming it on a model without a polytope, or when the server enforces it and a
request turns it off), a batch mixing guarded and plain sequences gives each the
tokens it gets alone, the guarded ones never complete the flagged string, the
Prometheus counters, and perspective-serve --safety."""

import threading

import httpx
import pytest

from perspective_jax.cli import serve as serve_cli
from perspective_jax.errors import UserError
from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.options import EngineOptions
from perspective_jax.model.sampling import Sampling
from perspective_jax.safety.flags import emitted
from perspective_jax.serve.api_errors import APIError
from perspective_jax.serve.app import ServeOptions
from perspective_jax.serve.protocol import Decoding, Limits, completion_request
from perspective_jax.serve.jobs import Done, Failed, Job, Token
from perspective_jax.serve.server import build_server
from safety_helpers import ELICIT, FLAG, TOK, head_and_states, make_polytope, model_has
from serve_helpers import MODEL, client, running

N_TOKENS = 12


@pytest.fixture(scope="module")
def guarded(exported):
    """(a server whose model has a polytope flagging "00" — requests may opt in —,
    the polytope)."""
    _, _, path = exported
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1))
    table, states = head_and_states(engine)
    engine.close()
    poly = make_polytope(table, states, (FLAG,), TOK.appended_bytes(), quantile=None)
    with model_has(poly), running(path) as server:
        yield server, poly


def _body(prompt, **perspective):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0}
    if perspective:
        body["perspective"] = perspective
    return body


def _error(resp, param):
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and err["message"].startswith(param)
    return err["message"]


def test_safety_on_a_model_without_a_polytope_is_400_naming_the_field(served):
    server, _ = served
    r = httpx.post(server.url + "/v1/completions", json=_body("hi", safety=True), timeout=60)
    assert "has no safety polytope" in _error(r, "perspective.safety")
    r = httpx.post(server.url + "/v1/completions", json=_body("hi", safety="yes"), timeout=60)
    _error(r, "perspective.safety")
    ok = httpx.post(server.url + "/v1/completions", json=_body("hi", safety=False), timeout=60)
    assert ok.status_code == 200


def _run_together(scheduler, requests: list) -> list:
    """Submit every (prompt, safety) as its own greedy job at once — admitted together,
    so they share each batched step — and return each job's token ids."""
    out = [[] for _ in requests]
    done = [threading.Event() for _ in requests]

    def emit_to(i):
        def emit(ev):
            if isinstance(ev, Token):
                out[i].append(ev.id)
            elif isinstance(ev, Failed):
                out[i].append(ev.error)
                done[i].set()
            elif isinstance(ev, Done):
                done[i].set()
        return emit
    jobs = [Job([TOK.encode(p).tolist()], Decoding(N_TOKENS, Sampling(temperature=0.0), 0,
                                                   safety=safe), emit_to(i))
            for i, (p, safe) in enumerate(requests)]
    with scheduler.cond:                      # held: the scheduler admits all of them at once
        for job in jobs:
            scheduler.submit(job)
    for event in done:
        assert event.wait(120)
    return out


def test_a_mixed_batch_gives_each_sequence_its_solo_tokens(guarded):
    server, poly = guarded
    scheduler = server.server.scheduler
    requests = [(ELICIT, True), (ELICIT, False), ("x0", True), ("hello", False)]
    alone = [_run_together(scheduler, [r])[0] for r in requests]
    steps = scheduler.engine.stats.batch_steps
    together = _run_together(scheduler, requests)
    assert scheduler.engine.stats.batch_steps - steps == N_TOKENS - 1   # one batch, all four
    assert together == alone
    flag = FLAG.encode()
    assert emitted(ELICIT.encode() + bytes(alone[1]), [flag])       # plain: it completes
    for (prompt, safe), ids in zip(requests, alone):
        if safe:
            assert not emitted(prompt.encode() + bytes(ids), [flag])


def test_requests_opt_in_and_the_counters_count_them(guarded):
    server, _ = guarded
    c = client(server)
    plain = c.completions.create(model=MODEL, prompt=ELICIT, max_tokens=N_TOKENS,
                                 temperature=0)
    safe = c.completions.create(model=MODEL, prompt=ELICIT, max_tokens=N_TOKENS,
                                temperature=0, extra_body={"perspective": {"safety": True}})
    assert FLAG in plain.choices[0].text and FLAG not in safe.choices[0].text
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    values = {ln.split()[0]: float(ln.split()[1]) for ln in metrics.splitlines()
              if ln.startswith("perspective_safety_")}
    assert values["perspective_safety_tokens_total"] >= N_TOKENS
    assert values["perspective_safety_projections_total"] >= 1
    # echo: every prompt position guarded after its own text
    r = httpx.post(server.url + "/v1/completions", timeout=60, json={
        **_body("a00b0", safety=True), "echo": True, "logprobs": 1, "max_tokens": 0})
    assert r.status_code == 200, r.text


def test_an_enforcing_server_refuses_to_turn_it_off(exported, guarded):
    from fastapi.testclient import TestClient
    _, _, path = exported
    _, poly = guarded
    with model_has(poly):
        server = build_server(path, opts=ServeOptions(model_name=MODEL), safety=True)
    assert server.scheduler.polytope is poly          # (not started: nothing loaded)
    r = TestClient(server.app).post("/v1/completions", json=_body("hi", safety=False))
    assert "cannot be turned off" in _error(r, "perspective.safety")
    limits = Limits(safety="enforced", vocab_size=259)
    body = {"model": MODEL, "prompt": "hi"}
    assert completion_request(body, limits).decoding.safety
    assert completion_request({**body, "perspective": {"mpd": True}}, limits).decoding.safety
    with pytest.raises(APIError, match="enforces the safety projection") as e:
        completion_request({**body, "perspective": {"safety": False}}, limits)
    assert e.value.param == "perspective.safety" and e.value.status == 400
    optional = Limits(safety="optional", vocab_size=259)
    assert not completion_request(body, optional).decoding.safety
    assert completion_request({**body, "perspective": {"safety": True}},
                              optional).decoding.safety


def test_serve_safety_needs_a_polytope_in_one_line(exported, capsys):
    _, _, path = exported
    with model_has(None):
        with pytest.raises(UserError, match="has no safety polytope"):
            build_server(path, opts=ServeOptions(model_name=MODEL), safety=True)
        assert serve_cli.run(["--model-dir", path, "--safety", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {path} has no safety polytope; build one with "
                   "perspective-train --stage safety and export it")
