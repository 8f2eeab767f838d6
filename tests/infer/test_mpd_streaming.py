"""MPD on the streaming engine (SPEC §3.6): the views run as one batched engine step
(experts grouped per layer across perspectives) and decide exactly what in-memory
MPD decides; --stats counts triggers, decisions, agreement and the views' bytes."""

import jax
import numpy as np
import pytest

from perspective_jax.config.schema import MPDConfig
from perspective_jax.data.byte_tokenizer import ByteTokenizer
from perspective_jax.errors import UserError
from perspective_jax.export.exporter import with_ternary_experts
from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.options import EngineOptions
from perspective_jax.infer.session import Conversation
from perspective_jax.model.generate import generate_mpd
from perspective_jax.model.sampling import Sampling

GREEDY = Sampling(temperature=0)


def _streamed(path, prompt, n, mpd):
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1, device_slots=3))
    conv = Conversation(engine, ByteTokenizer(), GREEDY, mpd=mpd)
    infos = []
    conv.generate(prompt, n, on_token=infos.append)
    report = engine.report()
    engine.close()
    return infos, report


@pytest.mark.slow
def test_streaming_mpd_equals_in_memory_mpd(exported_distinct):
    cfg, params, path = exported_distinct
    prompt, n = "MPD: ", 10
    mpd = MPDConfig(every_k=2, p_min=0.0, h_max=100.0, tau=0.003, max_rate=1.0)
    infos, report = _streamed(path, prompt, n, mpd)
    used = with_ternary_experts(jax.tree.map(np.asarray, params), cfg)
    ids = ByteTokenizer().encode(prompt)[None]
    tokens, steps = generate_mpd(cfg.model, used, ids, n, mpd, GREEDY, moe=cfg.moe,
                                 activation_bits=cfg.ternary.activation_bits)
    assert [i.id for i in infos] == tokens[0].tolist()
    np.testing.assert_array_equal([i.triggered for i in infos],
                                  [bool(s.triggered[0]) for s in steps])
    assert [i.triggered for i in infos] == [k % 2 == 0 for k in range(n)]   # every 2nd
    np.testing.assert_array_equal([i.kind for i in infos], [int(s.kind[0]) for s in steps])
    assert len({i.kind for i in infos if i.triggered}) >= 2, infos   # the views differ
    np.testing.assert_allclose([i.confidence for i in infos],
                               [float(s.confidence[0]) for s in steps], atol=2e-4)
    m = report["mpd"]
    assert (m["tokens"], m["triggered"], m["view_steps"]) == (n, n // 2, n // 2)
    assert m["trigger_rate"] == 0.5
    assert sum(m["decisions"].values()) == n // 2
    assert sum(m["agreement_histogram"].values()) == n // 2
    assert m["extra_expert_bytes"] > 0                       # the views brought experts
    assert report["decode_tokens"] == n      # the prompt's last token + n − 1; views are not
    assert "".join(i.text for i in infos) == ByteTokenizer().decode(tokens[0])


@pytest.mark.slow
def test_a_saved_mpd_conversation_resumes_identically(exported_distinct, tmp_path):
    """The budget counter travels with the saved state: a resumed conversation makes
    the same MPD decisions as one that never stopped."""
    _, _, path = exported_distinct
    mpd = MPDConfig(every_k=1, max_rate=0.3, tau=0.003)
    opts = EngineOptions(host_budget_mb=1, device_slots=3)
    whole, cut = [], []
    one = Conversation(StreamingEngine(path, opts), ByteTokenizer(), GREEDY, mpd=mpd)
    one.generate("MPD: ", 7, on_token=whole.append)
    one.generate("", 7, on_token=whole.append)
    two = Conversation(StreamingEngine(path, opts), ByteTokenizer(), GREEDY, mpd=mpd)
    two.generate("MPD: ", 7, on_token=cut.append)
    two.save(str(tmp_path / "chat.state"))
    three = Conversation.load(StreamingEngine(path, opts), ByteTokenizer(),
                              str(tmp_path / "chat.state"), GREEDY, mpd=mpd)
    assert three.mpd_spent == two.mpd_spent > 0
    three.generate("", 7, on_token=cut.append)
    assert [(i.id, i.triggered, i.kind) for i in cut] == [(i.id, i.triggered, i.kind)
                                                          for i in whole]
    assert [i.triggered for i in whole] != [True] * 14          # the budget acted
    for c in (one, two, three):
        c.engine.close()


def test_streaming_mpd_refuses_persistent_states_in_one_line(exported):
    _, _, path = exported
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1))
    with pytest.raises(UserError, match="forked"):
        Conversation(engine, ByteTokenizer(), GREEDY, mpd=MPDConfig(state="persistent"))
    engine.close()
