"""The lm-evaluation-harness model "perspective" on the small exported model (byte
tokenizer) against simple references: loglikelihood and rolling = Σ float64
log-softmax over the in-memory model's logits, fed one token at a time; generate_until
= a greedy Conversation; the perplexity task run by `lm_eval.simple_evaluate` =
bits per byte computed from one unpadded engine pass per document.

Every scoring pass here is 16 tokens or fewer and every generation prompt is fed in
single tokens or 16-token pieces, so the engine compiles two shapes for the module."""

import math
import os

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from perspective_jax.data.byte_tokenizer import ByteTokenizer  # noqa: E402
from perspective_jax.errors import UserError  # noqa: E402
from perspective_jax.evaluate.lm_eval_model import (PerspectiveHarnessLM,  # noqa: E402
                                                    padded_length)
from perspective_jax.infer.engine import StreamingEngine  # noqa: E402
from perspective_jax.infer.options import EngineOptions  # noqa: E402
from perspective_jax.infer.session import Conversation  # noqa: E402
from perspective_jax.model.sampling import Sampling  # noqa: E402
from streaming_helpers import token_logits  # noqa: E402

EOS = ByteTokenizer.EOS
TOL = dict(rel=1e-6, abs=1e-4)        # the engine against the in-memory model, summed
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "examples", "lm_eval")


def log_softmax64(z, n_valid=259):
    z = np.asarray(z, np.float64)[..., :n_valid]
    top = z.max(-1, keepdims=True)
    return z - top - np.log(np.exp(z - top).sum(-1, keepdims=True))


def requests(kind, *args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def ids(text):
    return ByteTokenizer().encode(text).tolist()


@pytest.fixture(scope="module")
def harness(exported):
    lm = PerspectiveHarnessLM(model_dir=exported[2], host_budget_mb=1)
    yield lm
    lm.close()


@pytest.fixture(scope="module")
def reference_engine(exported):
    engine = StreamingEngine(exported[2], EngineOptions(host_budget_mb=1))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def logits_of(exported):
    return token_logits(*exported[:2])


@pytest.fixture(scope="module")
def stepped(logits_of):
    """Σ log p(continuation | context) and greedy-ness, the in-memory model fed one
    token at a time (float64 log-softmax over the first n_valid ids)."""
    def score(context, continuation, n_valid=259):
        logp = log_softmax64(logits_of(context + continuation[:-1])[len(context) - 1:],
                             n_valid)
        return (float(logp[np.arange(len(continuation)), continuation].sum()),
                bool((logp.argmax(-1) == continuation).all()))
    return score


class FewerPieces(ByteTokenizer):
    """A tokenizer with 200 pieces: ids 200.. are outside it (masked)."""
    vocab_size = 200


def test_registered_under_perspective():
    assert get_model("perspective") is PerspectiveHarnessLM


def test_padded_lengths_are_few_and_never_shorter():
    assert [padded_length(n, 64) for n in (1, 16, 17, 33, 64, 65, 100, 128)] == [
        16, 16, 32, 64, 64, 80, 128, 128]
    assert padded_length(150, 100) == 164 and padded_length(5, 8) == 8


def test_loglikelihood_equals_log_softmax_of_the_model_fed_token_by_token(harness, stepped,
                                                                         logits_of):
    pairs = [("To be, or", " not to"), ("", "abcdefgh"), ("x" * 6, "yz" * 5), ("q", "")]
    got = harness.loglikelihood(requests("loglikelihood", *pairs), disable_tqdm=True)
    for (context, continuation), (ll, greedy) in zip(pairs, got):
        if not continuation:
            assert (ll, greedy) == (0.0, True)
            continue
        want, want_greedy = stepped(ids(context) or [EOS], ids(continuation))
        assert ll == pytest.approx(want, **TOL) and greedy == want_greedy
    # the tokens greedy decoding continues with are greedy; one other is not
    context = ids("To be, or not")
    for _ in range(3):
        context.append(int(logits_of(context)[-1].argmax()))
    assert harness.score(context[:-3], context[-3:])[1]
    assert not harness.score(context[:-3], context[-3:-1] + [(context[-1] + 1) % 259])[1]
    # ids beyond the tokenizer's pieces are left out of the softmax
    fewer = PerspectiveHarnessLM(engine=harness.engine, tokenizer=FewerPieces())
    [(ll, _)] = fewer.loglikelihood(requests("loglikelihood", ("To be", ", or not")), True)
    want, _ = stepped(ids("To be"), ids(", or not"), n_valid=200)
    assert ll == pytest.approx(want, **TOL)
    assert ll > stepped(ids("To be"), ids(", or not"))[0] + 1e-3


def test_rolling_equals_per_token_log_probs(harness, stepped):
    doc = ids("To be, or not to")                                    # 16 tokens
    [ll] = harness.loglikelihood_rolling(requests("loglikelihood_rolling",
                                                  ("To be, or not to",)), True)
    assert ll == pytest.approx(stepped([EOS], doc)[0], **TOL)
    assert harness.loglikelihood_rolling(requests("loglikelihood_rolling", ("",)),
                                         True) == [0.0]
    # max_length 6: each window predicts 6 tokens from the one before them; the last
    # (4 tokens) reads as much context as fits
    windowed = PerspectiveHarnessLM(engine=harness.engine, tokenizer=ByteTokenizer(),
                                    max_length=6)
    [ll6] = windowed.loglikelihood_rolling(requests("loglikelihood_rolling",
                                                    ("To be, or not to",)), True)
    want = (stepped([EOS], doc[:6])[0] + stepped(doc[5:6], doc[6:12])[0]
            + stepped(doc[9:12], doc[12:])[0])
    assert ll6 == pytest.approx(want, **TOL) and ll6 < ll - 1e-3


def test_generate_until_equals_a_greedy_conversation(harness, reference_engine):
    prompt = "To be, or not to"                                      # 16 tokens

    def conversation(prompt, n, stop=(), temperature=0.0):
        conv = Conversation(reference_engine, ByteTokenizer(), Sampling(temperature))
        if not prompt:
            conv.pending = [EOS]
        return conv.generate(prompt, n, stop=stop, eos_id=EOS)
    free = conversation(prompt, 12)
    stop = next(c for c in free[3:] if c != free[0])     # a stop string met mid-way
    args = [(prompt, {"until": [stop], "max_gen_toks": 12}),
            (prompt, {"until": "never", "max_gen_toks": 12, "do_sample": False}),
            ("", {"max_gen_toks": 5}),
            (prompt, {"max_gen_toks": 6, "temperature": 0.7}),
            (prompt, {"max_gen_toks": 6, "do_sample": True})]           # temperature 1
    got = harness.generate_until(requests("generate_until", *args), disable_tqdm=True)
    assert got == [conversation(prompt, 12, [stop]), free, conversation("", 5),
                   conversation(prompt, 6, temperature=0.7),
                   conversation(prompt, 6, temperature=1.0)]
    assert got[3] != free[: len(got[3])] or got[4] != free[: len(got[4])]     # sampled
    assert got[0] == free[: free.index(stop)] and len(got[0]) < len(free)


def test_model_args_errors_are_one_line(exported):
    for args, message in (("model_dir=" + exported[2] + ",max_length=1", "max_length=1"),
                          ("model_dir=" + exported[2] + ",temperature=0", "temperature"),
                          ("host_budget_mb=4", "needs model_args model_dir"),
                          ("model_dir=" + exported[2] + ",device_slots=two", "device_slots")):
        with pytest.raises(UserError, match=message) as err:
            PerspectiveHarnessLM.create_from_arg_string(args, {"batch_size": 1})
        assert "\n" not in str(err.value)


@pytest.fixture
def offline_datasets(monkeypatch, tmp_path):
    """The datasets library offline, its cache in tmp_path."""
    import datasets
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


PARAGRAPHS = ["To be, or not to", "be, that is the ", "question: whethe"]   # 16 bytes each


def test_perplexity_task_gives_the_models_bits_per_byte(harness, reference_engine,
                                                       offline_datasets, tmp_path,
                                                       monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager
    (tmp_path / "held_out.txt").write_text("\n\n".join(PARAGRAPHS))
    monkeypatch.chdir(tmp_path)                  # the task reads ./held_out.txt
    out = lm_eval.simple_evaluate(
        model=harness, tasks=["perspective_perplexity"], bootstrap_iters=0,
        task_manager=TaskManager(include_path=EXAMPLES, include_defaults=False),
        log_samples=False)
    got = out["results"]["perspective_perplexity"]
    total_ll = 0.0
    for text in PARAGRAPHS:                      # one unpadded pass per document
        doc = ids(text)
        logits, _ = reference_engine.forward(np.asarray([EOS] + doc[:-1]),
                                             reference_engine.new_state(), all_logits=True)
        total_ll += log_softmax64(logits)[np.arange(len(doc)), doc].sum()
    n_bytes = sum(len(p.encode()) for p in PARAGRAPHS)
    assert got["bits_per_byte,none"] == pytest.approx(-total_ll / n_bytes / math.log(2),
                                                      rel=1e-6)
    assert got["byte_perplexity,none"] == pytest.approx(math.exp(-total_ll / n_bytes),
                                                        rel=1e-6)
