"""Batched decode on the streaming engine: B sequences stepped together give each
the logits it gets decoded alone, sequences join and leave between steps, and
every expert a step needs is brought to the device once for the whole batch."""

import jax
import numpy as np
import pytest

from perspective_jax.errors import UserError
from perspective_jax.infer.engine import StreamingEngine
from perspective_jax.infer.options import EngineOptions
from perspective_jax.modeldir import format as md
from streaming_helpers import reference_logits

PROMPT_LENS = (5, 11, 8)
# (step at which the sequence joins, steps it decodes): sequence 2 joins at step 2,
# sequence 0 leaves after step 5
SCHEDULE = ((0, 6), (0, 8), (2, 6))


def _spy_ensure(engine) -> list:
    """Keys `engine` asks its tiers for, in order (the list is appended to)."""
    asked, ensure = [], engine.tiers.ensure
    engine.tiers.ensure = lambda key, then=None: (asked.append(key), ensure(key, then))[1]
    return asked


def _alone(path, options, prompts, tokens):
    """Per sequence: logits of each decode step and the experts it used, decoded alone."""
    engine = StreamingEngine(path, options)
    asked = _spy_ensure(engine)
    logits, used = [], []
    for prompt, toks in zip(prompts, tokens):
        _, state = engine.forward(prompt, engine.new_state())
        logits.append([])
        used.append([])
        for tok in toks:
            del asked[:]
            out, state = engine.forward(np.array([tok]), state)
            logits[-1].append(out)
            used[-1].append(set(asked))
    engine.close()
    return logits, used


def test_batched_steps_equal_each_sequence_alone_with_joins_leaves_and_evictions(exported):
    cfg, params, path = exported
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 259, n) for n in PROMPT_LENS]
    tokens = [rng.integers(0, 259, n) for _, n in SCHEDULE]
    region = md.RegionLayout(cfg.model.d_model, cfg.model.d_ff).nbytes
    # 3 regions of host cache and the double buffer: experts are evicted all the time
    options = EngineOptions(host_budget_mb=3 * region / 2**20, device_slots=2)
    alone, used = _alone(path, options, prompts, tokens)
    ref = reference_logits(cfg, params, prompts[1], tokens[1])       # the model itself
    np.testing.assert_allclose(np.stack(alone[1]), np.stack(ref[1:]), rtol=1e-4, atol=1e-4)

    engine = StreamingEngine(path, options)
    asked = _spy_ensure(engine)
    states, done, shared = {}, {b: 0 for b in range(3)}, 0
    for step in range(max(start + n for start, n in SCHEDULE)):
        for b, (start, n) in enumerate(SCHEDULE):
            if step == start:                               # joins: prefilled on its own
                _, states[b] = engine.forward(prompts[b], engine.new_state())
            if b in states and done[b] == n:                # leaves
                del states[b]
        active = sorted(states)
        brings = engine.stats.brings()
        asked.clear()
        logits, new = engine.step([states[b] for b in active],
                                  [tokens[b][done[b]] for b in active])
        assert logits.shape == (len(active), cfg.model.vocab_size)
        needed = set().union(*(used[b][done[b]] for b in active))
        # each expert the step needs is asked for and brought in exactly once
        assert sorted(asked) == sorted(needed), f"step {step}"
        assert engine.stats.brings() - brings == len(needed)
        shared += sum(len(used[b][done[b]]) for b in active) - len(needed)
        for row, b in enumerate(active):
            np.testing.assert_allclose(logits[row], alone[b][done[b]], rtol=1e-5, atol=1e-5,
                                       err_msg=f"sequence {b}, step {step}")
            states[b] = new[row]
            done[b] += 1
    report = engine.report()
    engine.close()
    assert done == {b: n for b, (_, n) in enumerate(SCHEDULE)}
    assert shared > 0                    # some steps had sequences sharing an expert
    assert report["host_cache_evictions"] > 0 and report["batch_steps"] == 8
    assert engine.host.peak_bytes <= engine.host.budget_bytes


def test_a_batched_step_leaves_its_states_as_they_were_and_checks_its_input(exported):
    _, _, path = exported
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1))
    _, state = engine.forward(np.arange(3, 9), engine.new_state())
    one, (after,) = engine.step([state], [17])
    alone, again = engine.forward(np.array([17]), state)         # from the same state
    np.testing.assert_array_equal(one[0], alone)
    assert after.next_pos == again.next_pos == state.next_pos + 1 == 7
    with pytest.raises(UserError, match="one token per sequence"):
        engine.step([state, state], [1])
    with pytest.raises(UserError, match="token ids must lie"):
        engine.step([state], [10 ** 6])
    engine.close()


def test_a_kept_batch_steps_as_its_states_and_rows_join_leave_and_repeat(exported):
    from perspective_jax.infer import state as S
    _, _, path = exported
    engine = StreamingEngine(path, EngineOptions(host_budget_mb=1))
    states = [engine.forward(np.arange(3 + b, 9 + 2 * b) % 250, engine.new_state())[1]
              for b in range(3)]
    want, after = engine.step(states, [5, 6, 7])
    batch = S.batch_of(states)
    got, nxt = engine.step_batch(batch, [5, 6, 7])
    np.testing.assert_array_equal(got, want)
    assert [S.row(nxt, b).next_pos for b in range(3)] == [s.next_pos for s in after]
    for b in range(3):                      # row b of the kept batch is state b's successor
        for x, y in zip(jax.tree.leaves(S.row(nxt, b).layers), jax.tree.leaves(after[b].layers)):
            np.testing.assert_array_equal(x, y)
    # rows leave (take), join (concat) and repeat (padding): each row steps as alone
    mixed = S.concat(S.take_rows(nxt, [2, 0]), S.batch_of([states[1]]))
    padded = S.take_rows(mixed, [0, 1, 2, 0])
    logits, _ = engine.step_batch(padded, [9, 9, 6, 9])
    alone = [engine.forward(np.array([t]), s)[0]
             for s, t in ((after[2], 9), (after[0], 9), (states[1], 6))]
    np.testing.assert_allclose(logits[:3], np.stack(alone), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(logits[3], logits[0])
    with pytest.raises(UserError, match="one token per sequence"):
        engine.step_batch(padded, [1, 2])
    engine.close()
