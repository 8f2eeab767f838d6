"""perspective-serve --adapter: requests decode with the adapter by default, exactly
as the streaming engine driven by hand with the adapter's extensions; a request
with `perspective.adapter: false` is the plain model; a batch holding both kinds
gives each row the model it asked for; the adapter's expert coordinates move
only the adapted requests' routers; 400s for a bad field or an adapter asked of a
server without one; the Prometheus counter and /health; a file of another model
or a damaged one refused at startup in one line."""

import threading

import httpx
import jax
import numpy as np
import pytest

from perspective_jax.adapt.adapter_file import AdapterSpec, save_adapters
from perspective_jax.adapt.attach import attach_adapter
from perspective_jax.adapt.coords import engine_positions
from perspective_jax.cli import serve as serve_cli
from perspective_jax.data.byte_tokenizer import ByteTokenizer
from perspective_jax.errors import UserError
from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.options import EngineOptions
from perspective_jax.model.extensions import init_lora
from perspective_jax.serve.adapter import ServedAdapter
from perspective_jax.serve.api_errors import APIError
from perspective_jax.serve.jobs import Done, Failed, Job, Token
from perspective_jax.serve.protocol import Limits, completion_request
from perspective_jax.serve.server import build_server
from serve_helpers import MODEL, client, running
from streaming_helpers import flip_bit

PROMPT, N = "To be, or not", 6
TOK = ByteTokenizer()
WAIT_S = 120


def _adapter(cfg, path, identity, b=0.5, coords=None, rank=4):
    """An adapter file whose B = b everywhere (A random), so it changes the logits."""
    lora = init_lora(cfg.model, jax.random.key(3), rank, init_scale=0.3)
    lora = jax.tree_util.tree_map_with_path(
        lambda p, a: np.full(a.shape, b, np.float32) if p[-1].key == "b" else a, lora)
    save_adapters(str(path), lora, identity, AdapterSpec(rank=rank), coords=coords)
    return str(path)


@pytest.fixture(scope="module")
def setup(exported, tmp_path_factory):
    """(cfg, model dir, adapter file, hand engine, its adapter extensions)."""
    cfg, _, path = exported
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1))
    file = _adapter(cfg, tmp_path_factory.mktemp("adapter") / "a.adapter", engine.identity)
    attached = attach_adapter(engine, file)
    yield cfg, path, file, engine, attached
    engine.close()


@pytest.fixture(scope="module")
def server(setup):
    _, path, file, _, _ = setup
    with running(path, adapter=file) as srv:
        yield srv


def _greedy(engine, ids, n, ext):
    """Greedy tokens of the engine driven by hand (stops at EOS, as the server)."""
    logits, state = engine.forward(np.asarray(ids, np.int32), engine.new_state(), ext)
    out = []
    for _ in range(n):
        tok = int(np.argmax(np.asarray(logits)[:TOK.vocab_size]))
        out.append(tok)
        if tok == TOK.eos_id:
            break
        rows, states = engine.step([state], [tok], ext)
        logits, state = rows[0], states[0]
    return out


def _completion(server, on=None, **kw):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": N, "temperature": 0, **kw}
    if on is not None:
        body["perspective"] = {"adapter": on}
    return httpx.post(server.url + "/v1/completions", json=body, timeout=60)


def _counter(server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    line = [ln for ln in text.splitlines()
            if ln.startswith("perspective_adapter_requests_total ")]
    return float(line[0].split()[-1])


def test_completions_equal_the_engine_with_and_without_the_adapter(setup, server):
    _, _, _, engine, attached = setup
    ids = TOK.encode(PROMPT).tolist()
    adapted = _greedy(engine, ids, N, attached.extensions())
    plain = _greedy(engine, ids, N, None)
    assert adapted != plain                                    # the adapter acts
    before = _counter(server)
    r = client(server).completions.create(model=MODEL, prompt=PROMPT, max_tokens=N,
                                          temperature=0)
    assert r.choices[0].text == TOK.decode(adapted)                    # on by default
    assert _completion(server, True).json()["choices"][0]["text"] == TOK.decode(adapted)
    off = _completion(server, False)
    assert off.status_code == 200 and off.json()["choices"][0]["text"] == TOK.decode(plain)
    assert _counter(server) == before + 2                      # the two with the adapter


def test_a_batch_of_both_kinds_gives_each_row_its_model(setup, server):
    """Jobs submitted together join one batch: every step holds rows with and without
    the adapter (split into two engine steps), and each row's tokens are its own."""
    _, _, _, engine, attached = setup
    sched = server.server.scheduler
    prompts = [PROMPT, "Whether 'tis ", "The slings an"]       # one length: one prefill
    kinds = [True, False, True]
    want = [_greedy(engine, TOK.encode(p).tolist(), N,
                    attached.extensions() if on else None) for p, on in zip(prompts, kinds)]
    splits, real = [], sched._step_split
    sched._step_split = lambda rows, k: splits.append(list(k)) or real(rows, k)
    try:
        got, done = [[] for _ in prompts], threading.Event()
        left = [len(prompts)]

        def emit(i):
            def on(ev):
                if isinstance(ev, Token):
                    got[i].append(ev.id)
                elif isinstance(ev, (Done, Failed)):
                    assert not isinstance(ev, Failed), ev.error.message
                    left[0] -= 1
                    if not left[0]:
                        done.set()
            return on
        limits = Limits(adapter=True, vocab_size=TOK.vocab_size)
        jobs = [Job([TOK.encode(p).tolist()], completion_request(
            {"model": MODEL, "prompt": p, "max_tokens": N, "temperature": 0,
             "perspective": {"adapter": on}}, limits).decoding, emit(i))
            for i, (p, on) in enumerate(zip(prompts, kinds))]
        with sched.cond:                      # admitted together, in one _admit
            for job in jobs:
                sched.submit(job)
        assert done.wait(WAIT_S)
    finally:
        sched._step_split = real
    assert got == want
    assert splits and all(set(k) == {False, True} for k in splits)


def test_adapter_field_errors_are_400s_naming_it(server):
    for bad in ("yes", 1, [True]):
        r = _completion(server, bad)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "perspective.adapter" and "true or false" in err["message"]
    # a server without an adapter: asking for one names the flag (the same check)
    with pytest.raises(APIError) as exc:
        completion_request({"model": MODEL, "prompt": "x",
                            "perspective": {"adapter": True}}, Limits(vocab_size=259))
    assert exc.value.status == 400 and exc.value.param == "perspective.adapter"
    assert "--adapter" in str(exc.value.body())
    plain = completion_request({"model": MODEL, "prompt": "x"}, Limits(vocab_size=259))
    assert plain.decoding.adapter is False
    assert completion_request({"model": MODEL, "prompt": "x"},
                              Limits(vocab_size=259, adapter=True)).decoding.adapter


def test_health_shows_the_adapter(setup, server):
    _, _, file, _, _ = setup
    h = httpx.get(server.url + "/health", timeout=30).json()
    assert h["status"] == "ok"
    assert h["adapter"] == {"path": file, "rank": 4, "targets": ["w_p"], "scale": 1.0,
                            "coords": False}


def test_expert_coordinates_move_only_the_adapted_calls(exported, setup, tmp_path):
    """A file with expert coordinates: the adapted view equals a fresh engine with the
    file attached (routers moved, LoRA on); the engine itself stays the plain model."""
    cfg, path, _, engine, _ = setup
    z = engine_positions(engine)
    moved = {k: (v + 0.37) % 1.0 for k, v in z.items()}
    file = _adapter(cfg, tmp_path / "z.adapter", engine.identity, b=0.0, coords=moved)
    ids = np.asarray(TOK.encode(PROMPT), np.int32)
    plain, _ = engine.forward(ids, engine.new_state())
    served = ServedAdapter.attach(engine, file)
    on, _ = served.engine_for(True).forward(ids, engine.new_state())
    off, _ = served.engine_for(False).forward(ids, engine.new_state())
    np.testing.assert_array_equal(off, plain)
    fresh = StreamingEngine(path, EngineOptions(host_budget_mb=1))
    try:
        att = attach_adapter(fresh, file)
        want, _ = fresh.forward(ids, fresh.new_state(), att.extensions())
    finally:
        fresh.close()
    np.testing.assert_allclose(on, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(on, plain)                          # the coordinates act
    assert served.info()["coords"] is True


def test_a_wrong_adapter_is_refused_at_startup_in_one_line(setup, tmp_path, capsys):
    cfg, path, file, _, _ = setup
    other = _adapter(cfg, tmp_path / "other.adapter", "another-model")
    with pytest.raises(UserError, match="another model"):
        build_server(path, adapter=other)
    assert serve_cli.run(["--model-dir", path, "--adapter", other, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "another model" in err and err.count("\n") == 1
    damaged = tmp_path / "damaged.adapter"
    damaged.write_bytes(open(file, "rb").read())
    flip_bit(str(damaged), damaged.stat().st_size - 5)
    assert serve_cli.run(["--model-dir", path, "--adapter", str(damaged), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(damaged) in err and err.count("\n") == 1


@pytest.mark.slow                      # compiles MPD's 3-row view steps with the adapters
def test_mpd_runs_its_views_on_the_adapted_model(server):
    """MPD's views go through the adapted engine (`engine.step` with its keywords)."""
    r = _completion(server, None, max_tokens=3,
                    perspective={"mpd": True, "confidence": True})
    assert r.status_code == 200, r.text
    ext = r.json()["choices"][0]["perspective"]
    assert len(ext["confidence"]) == 3 and any(ext["mpd"])
