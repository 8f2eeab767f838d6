"""Flagged strings → token rows (perspective_jax.safety.flags) against a brute force.

The reference: appending token text t to text ending in `tail` completes a flagged
string s when tail + t holds an occurrence of s that ends inside t (one that was
not there before), found by trying every start position.
"""

import itertools

import numpy as np
import pytest

from perspective_jax.errors import UserError
from perspective_jax.safety.flags import FlagRules, emitted


def completes(tail: bytes, text: bytes, strings) -> bool:
    joined = tail + text
    return any(joined[p:p + len(s)] == s and p + len(s) > len(tail)
               for s in strings for p in range(len(joined) - len(s) + 1))


def random_bytes(rng, alphabet: bytes, lo: int, hi: int) -> bytes:
    return bytes(rng.choice(list(alphabet), size=rng.integers(lo, hi + 1)).tolist())


def rows_of(rules: FlagRules) -> dict:
    return {int(t): r for r, t in enumerate(rules.token_ids)}


@pytest.mark.parametrize("seed", range(12))
def test_active_rows_are_exactly_the_tokens_that_complete_a_flagged_string(seed):
    """Random vocabularies over a 3-letter alphabet (so matches are frequent), a few
    empty (special) tokens, random flagged strings of 1–5 bytes, random tails."""
    rng = np.random.default_rng(seed)
    alphabet = b"ab."
    appended = [random_bytes(rng, alphabet, 1, 4) for _ in range(40)] + [b""] * 3
    strings = [random_bytes(rng, alphabet, 1 if seed % 4 == 0 else 2, 5) for _ in range(3)]
    rules = FlagRules.build(strings, appended)
    flagged = rules.strings
    assert set(flagged) == set(strings)
    row = rows_of(rules)
    assert len(row) == rules.size == len(set(rules.token_ids.tolist()))
    for _ in range(25):
        tail = random_bytes(rng, alphabet, 0, 9)
        mask = rules.active(tail)
        assert mask.shape == (rules.size,) and mask.dtype == bool
        np.testing.assert_array_equal(rules.active(tail[-rules.tail_bytes:]), mask)
        for t, text in enumerate(appended):
            want = completes(tail, text, flagged)
            assert rules.completes(tail, text) == want, (tail, text)
            if t in row:
                assert mask[row[t]] == want, (tail, text, flagged)
            else:
                assert not want, (tail, text, flagged)   # an unlisted token never completes one
    for t, r in row.items():                             # always: the text holds a string
        assert rules.always[r] == any(s in appended[t] for s in flagged)


@pytest.mark.parametrize("context", [b"", b"x = ", b"os.sys"])
def test_a_string_over_three_or_more_tokens_is_stopped_at_its_last_token(context):
    """Every split of "os.system" into 3+ pieces, after several contexts: no piece
    but the last is active, the last always is (whatever the split)."""
    s = b"os.system"
    pieces = {s[i:j] for i in range(len(s)) for j in range(i + 1, len(s) + 1)}
    appended = sorted(pieces | {b"x", b" = ", b"(", b"\n"})
    rules = FlagRules.build(["os.system"], appended)
    row = rows_of(rules)
    index = {text: t for t, text in enumerate(appended)}
    n_splits = 0
    for cuts in itertools.chain.from_iterable(
            itertools.combinations(range(1, len(s)), k) for k in range(2, len(s))):
        split = [s[i:j] for i, j in zip((0, *cuts), (*cuts, len(s)))]
        text = context
        for i, piece in enumerate(split):
            t = index[piece]
            mask = rules.active(text[-rules.tail_bytes:])
            active = t in row and bool(mask[row[t]])
            assert active == (i == len(split) - 1), (context, split, i)
            text += piece
        n_splits += 1
    assert n_splits == 2 ** (len(s) - 1) - 1 - (len(s) - 1)      # every split into ≥ 3


def test_a_token_holding_a_flagged_string_is_always_active():
    appended = [b"eval(", b"x = eval(1)", b"ev", b"al(", b"val", b""]
    rules = FlagRules.build(["eval("], appended)
    row = rows_of(rules)
    for tail in (b"", b"ev", b"print(", b"x"):
        mask = rules.active(tail)
        assert mask[row[0]] and mask[row[1]]
    assert rules.always[row[0]] and rules.always[row[1]] and not rules.always[row[3]]
    assert not rules.active(b"print(")[row[3]] and rules.active(b"x = ev")[row[3]]
    assert 2 not in row and 5 not in row                 # a middle piece, a special token


def test_strings_are_matched_as_utf8_bytes_even_split_inside_a_character():
    """"é" is b"\\xc3\\xa9": a token ending in \\xc3 followed by one starting with \\xa9."""
    appended = [b"caf\xc3", b"\xa9", b"\xa9s", b"e"]
    rules = FlagRules.build(["é"], appended)
    assert rules.strings == ("é".encode("utf-8"),)
    row = rows_of(rules)
    assert set(row) == {1, 2}
    assert rules.active(b"caf\xc3")[row[1]] and rules.active(b"caf\xc3")[row[2]]
    assert not rules.active(b"cafe")[row[1]]


def test_duplicates_collapse_and_bad_lists_are_user_errors():
    rules = FlagRules.build(["ab", b"ab", "ab"], [b"ab", b"a", b"b"])
    assert rules.strings == (b"ab",)
    for bad in ([], (), ["ok", ""], [b""]):
        with pytest.raises(UserError, match="non-empty"):
            FlagRules.build(bad, [b"a"])


def test_emitted():
    assert emitted(b"x = os.system('ls')", (b"eval(", b"os.system"))
    assert not emitted(b"os.sys tem", (b"os.system",))
