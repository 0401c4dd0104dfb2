"""Stop strings under hostile input: bounded count and length, and matching whose
per-token cost does not grow with the output or with the stop string's length."""

from __future__ import annotations

import pytest

from sluice.runtime.detokenizer import (MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS,
                                        IncrementalDetokenizer)
from sluice.runtime.tokenizer import Tokenizer

BYTES = Tokenizer.byte_level()
BOS = BYTES.hf.token_to_id("<s>")


class CountingStr(str):
    """A stop string that counts how often the matcher reads it (indexing or slicing)."""

    reads = 0

    def __getitem__(self, key):
        CountingStr.reads += 1
        return str.__getitem__(self, key)


@pytest.mark.parametrize("stop, message", [
    (["x"] * (MAX_STOP_STRINGS + 1), "at most"),
    (["y" * (MAX_STOP_STRING_CHARS + 1)], "characters"),
    (["ok", ""], "empty"),
])
def test_stop_strings_past_the_limits_are_refused(stop, message):
    with pytest.raises(ValueError, match=f"stop: .*{message}"):
        IncrementalDetokenizer(BYTES, [BOS], stop=stop)


def test_limits_themselves_are_accepted():
    stops = ["z" * MAX_STOP_STRING_CHARS] + [f"s{i}" for i in range(MAX_STOP_STRINGS - 1)]
    d = IncrementalDetokenizer(BYTES, [BOS], stop=stops)
    for t in BYTES.encode("s3", add_special_tokens=False):
        d.add_token(t)
    assert d.stop_reason == "s3"


def test_per_token_cost_does_not_grow_with_the_stop_string():
    """A stop string at the length limit that the text keeps almost matching
    ('aaa...' against 'aaa...ab'): the matcher reads it O(1) times per new
    character, not O(its length) (the quadratic check stalled the engine)."""
    stop = CountingStr("a" * (MAX_STOP_STRING_CHARS - 1) + "b")
    d = IncrementalDetokenizer(BYTES, [BOS], stop=[stop])
    CountingStr.reads = 0
    tokens = BYTES.encode("a" * 300, add_special_tokens=False)
    for t in tokens:
        assert not d.add_token(t)
        assert d.take_delta() == ""  # all of it could still become the stop string
    assert CountingStr.reads <= 4 * len(tokens)
    d.add_token(BYTES.encode("c", add_special_tokens=False)[0])
    assert d.take_delta() == "a" * 300 + "c"  # ruled out: released at once
