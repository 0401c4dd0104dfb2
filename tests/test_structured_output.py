"""Structured outputs: constraints checked at intake, masks that allow exactly the
constraint's continuations, and matcher state rebuilt from emitted tokens."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from sluice.runtime.sampling_params import SamplingParams
from sluice.runtime.structured_output import (GrammarState, StructuredOutputManager,
                                              StructuredOutputs)
from sluice.runtime.tokenizer import Tokenizer

VOCAB = 320  # more than the byte-level tokenizer's 259 tokens, as a model's padded vocabulary
EOS = 257


class _Req:
    def __init__(self, constraint: StructuredOutputs | None, out: list[int] | None = None):
        self.grammar = GrammarState(constraint) if constraint else None
        self.output_token_ids = out or []


@pytest.fixture(scope="module")
def manager() -> StructuredOutputManager:
    return StructuredOutputManager(Tokenizer.byte_level(), VOCAB, (EOS,))


def allowed(mask: np.ndarray) -> set[int]:
    return {t for t in range(VOCAB) if (int(mask[t >> 5]) >> (t & 31)) & 1}


@pytest.mark.parametrize("kw, field, words", [
    ({"regex": "[a-z"}, "structured_outputs.regex", "unclosed"),
    ({"json": "{not json"}, "structured_outputs.json", "not valid JSON"),
    ({"json": {"type": "foo"}}, "structured_outputs.json", "Invalid type"),
    ({"json": {"type": "object", "dependentSchemas": {"a": {}}}}, "structured_outputs.json",
     "Unimplemented"),
    ({"grammar": "start: (("}, "structured_outputs.grammar", "Expected"),
    ({"choice": []}, "structured_outputs.choice", "non-empty"),
    ({"regex": "a", "choice": ["b"]}, "structured_outputs", "exactly one"),
    ({}, "structured_outputs", "exactly one"),
])
def test_bad_constraints_name_the_field(kw, field, words):
    with pytest.raises(ValueError, match=rf"^{field}: .*{words}"):
        StructuredOutputs(**kw)
    with pytest.raises(ValueError, match=rf"^{field}: "):
        SamplingParams(structured_outputs=kw)


def test_sampling_params_takes_a_dict_or_the_object():
    c = StructuredOutputs(choice=["a", "b"])
    assert SamplingParams(structured_outputs=c).structured_outputs is c
    assert SamplingParams(structured_outputs={"choice": ["a", "b"]}).structured_outputs == c
    with pytest.raises(ValueError, match="^structured_outputs: must be"):
        SamplingParams(structured_outputs="json")
    # the one dict mapping (also the server's for vLLM's structured_outputs object):
    # vLLM's backend options are ignored, another unknown field is named
    assert SamplingParams(structured_outputs={"choice": ["a", "b"], "backend": "xgrammar",
                                              "disable_fallback": True}).structured_outputs == c
    with pytest.raises(ValueError, match="^structured_outputs: unknown field 'colour'"):
        SamplingParams(structured_outputs={"choice": ["a"], "colour": "red"})


def test_masks_allow_exactly_the_constraints_continuations(manager):
    free, choice = _Req(None), _Req(StructuredOutputs(choice=["yes", "no"]))
    masks = manager.fill_masks([free, choice])
    assert list(masks) == [1]  # unconstrained rows get no mask
    assert allowed(masks[1]) == {ord("y"), ord("n")}
    choice.output_token_ids = list(b"ye")
    assert allowed(manager.fill_masks([choice])[0]) == {ord("s")}
    choice.output_token_ids = list(b"yes")
    assert allowed(manager.fill_masks([choice])[0]) == {EOS}  # done: only the end
    assert all(t < 259 for t in allowed(manager.fill_masks([_Req(StructuredOutputs(
        json_object=True))])[0]))  # padding ids past the tokenizer are never allowed


def test_state_rebuilt_from_tokens_equals_the_incremental_one(manager):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    text = json.dumps({"a": 12})
    live = _Req(StructuredOutputs(json=schema))
    for i in range(len(text)):
        live.output_token_ids = list(text[:i].encode())
        incremental = manager.fill_masks([live])[0]
        rebuilt = _Req(StructuredOutputs(json=schema), list(text[:i].encode()))
        assert np.array_equal(manager.fill_masks([rebuilt])[0], incremental)
        # a pickled request (Ray) carries no native matcher and rebuilds it the same way
        moved = pickle.loads(pickle.dumps(live.grammar))
        assert moved.matcher is None
        carrier = _Req(None, list(text[:i].encode()))
        carrier.grammar = moved
        assert np.array_equal(manager.fill_masks([carrier])[0], incremental)


def test_a_token_outside_the_mask_is_refused(manager):
    req = _Req(StructuredOutputs(regex="ab"))
    manager.fill_masks([req])
    assert req.grammar.refusal(ord("a"), 0) is None
    assert req.grammar.refusal(ord("z"), 0) == "grammar: token 122 is not allowed here"
    assert req.grammar.refusal(ord("z"), 1) is None  # that mask was for another position
    req.output_token_ids = [ord("z")]  # forced through anyway: the state records why
    manager.fill_masks([req])
    assert req.grammar.error.startswith("grammar: token 122 was not allowed")
