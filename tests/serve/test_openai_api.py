"""perspective-serve through the official `openai` client: completions and chat,
streamed and not, usage, stop strings, seeds, echo + logprobs against the engine's
own log-probabilities, and equality with perspective-infer."""

import io
import json
import contextlib

import httpx
import numpy as np
import pytest

from perspective_jax.cli import infer as infer_cli
from perspective_jax.data.byte_tokenizer import ByteTokenizer
from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.options import EngineOptions
from serve_helpers import MODEL, client

PROMPT = "def main(argv):\n    "


def _infer(path, *args) -> str:
    """perspective-infer's generated text (stdout minus the echoed prompt)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert infer_cli.run(["--model-dir", path, PROMPT, "--host-budget-mb", "1",
                              *args]) == 0
    text = out.getvalue()
    assert text.startswith(PROMPT) and text.endswith("\n")
    return text[len(PROMPT):-1]


def _ids(choice) -> list:
    """Generated tokens as unique strings (bytes:\\xNN for a lone byte)."""
    return choice.logprobs.tokens


def test_greedy_and_seeded_completions_equal_perspective_infer(served):
    server, path = served
    c = client(server)
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == _infer(path, "--temperature", "0", "--max-tokens", "12")
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(PROMPT.encode()) and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    # a seed reproduces, equals perspective-infer --seed, and other seeds differ
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0.9, logprobs=0)
    a, b = (c.completions.create(seed=7, **kw) for _ in range(2))
    assert _ids(a.choices[0]) == _ids(b.choices[0])
    assert a.choices[0].text == _infer(path, "--temperature", "0.9", "--top-k", "0",
                                       "--seed", "7", "--max-tokens", "12")
    others = {tuple(_ids(c.completions.create(seed=s, **kw).choices[0])) for s in (8, 9)}
    assert tuple(_ids(a.choices[0])) not in others
    # n choices: choice j is seed + j
    n3 = c.completions.create(seed=7, n=3, **kw)
    assert [ch.index for ch in n3.choices] == [0, 1, 2]
    assert _ids(n3.choices[0]) == _ids(a.choices[0])
    assert _ids(n3.choices[1]) == _ids(c.completions.create(seed=8, **kw).choices[0])
    assert n3.usage.completion_tokens == 36


def test_streamed_completion_equals_the_whole_one_and_stop_strings_cut(served):
    server, _ = served
    c = client(server)
    whole = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    text = whole.choices[0].text
    pieces, reasons = [], []
    for chunk in c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24,
                                      temperature=0, stream=True):
        for ch in chunk.choices:
            pieces.append(ch.text)
            reasons.append(ch.finish_reason)
    assert "".join(pieces) == text and reasons[-1] == "length"
    assert all(r is None for r in reasons[:-1])
    # stop at a piece of the greedy text: cut before it, finish_reason "stop"
    stop = text[5:8]
    cut = text[: text.find(stop)]
    for stream in (False, True):
        r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                 stop=[stop, "\x00never"], stream=stream)
        if stream:
            chunks = list(r)
            got = "".join(ch.text for k in chunks for ch in k.choices)
            reason = [ch.finish_reason for k in chunks for ch in k.choices][-1]
        else:
            got, reason = r.choices[0].text, r.choices[0].finish_reason
        assert (got, reason) == (cut, "stop")


def test_echo_logprobs_are_the_engines_log_probabilities(served):
    server, path = served
    c = client(server)
    prompt = "import os\nprint("
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
                             echo=True, logprobs=3)
    lp = r.choices[0].logprobs
    ids = list(prompt.encode())
    assert r.choices[0].text.startswith(prompt)
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1))
    logits, _ = engine.forward(np.asarray(ids), engine.new_state(), all_logits=True)
    engine.close()
    z = logits.astype(np.float64)[:, :ByteTokenizer.vocab_size]
    ref = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - z.max(1, keepdims=True)
    want = [ref[t, ids[t + 1]] for t in range(len(ids) - 1)]
    np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], want, rtol=1e-5, atol=1e-5)
    # the generated token is the greedy one, its top-3 sorted and containing it
    top = lp.top_logprobs[len(ids)]
    assert len(top) == 3 and max(top.values()) == lp.token_logprobs[-1]
    np.testing.assert_allclose(max(top.values()), ref[-1].max(), rtol=1e-5, atol=1e-5)
    # what lm-evaluation-harness's local-completions sends: token ids, max_tokens 1
    again = c.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0,
                                 echo=True, logprobs=1)
    assert again.choices[0].logprobs.token_logprobs == lp.token_logprobs
    # echo without generating
    zero = c.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True,
                                logprobs=0)
    assert zero.choices[0].text == prompt and zero.usage.completion_tokens == 0
    assert zero.choices[0].logprobs.token_logprobs == lp.token_logprobs[:-1]


def test_chat_streams_as_the_official_client_expects(served):
    server, _ = served
    c = client(server)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    whole = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10,
                                      temperature=0)
    msg = whole.choices[0].message
    assert msg.role == "assistant" and whole.object == "chat.completion"
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert len({k.id for k in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.delta.role is None for k in chunks[1:] for ch in k.choices)
    content = "".join(ch.delta.content or "" for k in chunks for ch in k.choices)
    assert content == msg.content
    finishing = [k for k in chunks if k.choices and k.choices[0].finish_reason]
    assert finishing == [chunks[-2]] and chunks[-2].choices[0].finish_reason == \
        whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    # the raw stream ends with [DONE]
    body = {"model": MODEL, "messages": msgs, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      timeout=60) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    # logprobs in chat; the perspective extension (confidence per token)
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0,
                                  logprobs=True, top_logprobs=2,
                                  extra_body={"perspective": {"confidence": True}})
    content_lp = r.choices[0].logprobs.content
    assert len(content_lp) == 4 and all(len(e.top_logprobs) == 2 for e in content_lp)
    ext = r.choices[0].model_extra["perspective"]
    assert len(ext["confidence"]) == 4 and all(0 < p <= 1 for p in ext["confidence"])
    np.testing.assert_allclose(ext["confidence"], [np.exp(e.top_logprobs[0].logprob)
                                                   for e in content_lp], rtol=1e-5)


def test_tokenize_detokenize_models_and_tokenizer_info(served):
    server, _ = served
    get = lambda p: httpx.get(server.url + p, timeout=30)          # noqa: E731
    post = lambda p, b: httpx.post(server.url + p, json=b, timeout=30)  # noqa: E731
    assert get("/health").json() == {"status": "ok"}
    assert [m["id"] for m in get("/v1/models").json()["data"]] == [MODEL]
    info = get("/tokenizer_info").json()
    toks = post("/tokenize", {"prompt": "héllo" + info["eos_token"]}).json()
    assert toks["tokens"] == list("héllo".encode()) + [ByteTokenizer.EOS]
    assert toks["count"] == len(toks["tokens"])
    assert post("/detokenize", {"tokens": toks["tokens"]}).json() == {"prompt": "héllo"}
    chat = post("/tokenize", {"messages": [{"role": "user", "content": "x"}]}).json()
    assert chat["count"] > 5 and "im_start" in info["chat_template"]
    metrics = get("/metrics").text
    for name in ("perspective_requests_total", "perspective_prompt_tokens_total",
                 "perspective_generation_tokens_total", "perspective_queue_depth",
                 "perspective_running_sequences", "perspective_decode_tokens_per_second",
                 "perspective_host_cache_hit_rate", "perspective_expert_bytes_moved_total",
                 "perspective_mpd_trigger_rate",
                 "perspective_time_per_output_token_seconds_bucket"):
        assert name in metrics, name
    assert 'perspective_requests_total{endpoint="/health",status="200"}' in metrics


def test_mpd_extension_decides_as_perspective_infer_mpd(served):
    server, path = served
    c = client(server)
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                             extra_body={"perspective": {"mpd": True, "confidence": True}})
    assert r.choices[0].text == _infer(path, "--temperature", "0", "--max-tokens", "10",
                                       "--mpd")
    ext = r.choices[0].model_extra["perspective"]
    assert any(ext["mpd"]) and len(ext["confidence"]) == 10
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    rate = [ln for ln in metrics.splitlines() if ln.startswith("perspective_mpd_trigger_rate")]
    assert float(rate[0].split()[-1]) > 0
    assert json.loads(json.dumps(ext))                           # plain JSON
