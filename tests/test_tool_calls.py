"""Tool calls: parsed from each family's format, streamed incrementally (the
header as soon as the name is known, then the arguments' text as it is decoded)
as deltas that the official client's accumulation turns into the non-streamed
calls, for every prefix of the text and any split of it into tokens, and the
constraints "required" and a named function put on decoding."""

from __future__ import annotations

import copy
import json
import random

import jsonschema
import pytest

from sluice.runtime.tool_calls import ToolCalling, ToolCallStream, detect_format

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
ARGS1, ARGS2 = '{"city": "Paris", "days": 2}', '{"zone": "CET"}'

TEXTS = {
    "hermes": ("Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
               f"{ARGS1}}}\n</tool_call>\n<tool_call>\n{{\"name\": \"get_time\", "
               f"\"arguments\": {ARGS2}}}\n</tool_call>", "Let me check."),
    "mistral": (f'Sure [TOOL_CALLS] [{{"name": "get_weather", "arguments": {ARGS1}}}, '
                f'{{"name": "get_time", "arguments": {ARGS2}}}]', "Sure"),
    "llama3": (f'{{"name": "get_weather", "parameters": {ARGS1}}}; '
               f'{{"name": "get_time", "parameters": {ARGS2}}}', None),
}


def accumulate(deltas: list[dict]) -> tuple[str, list[dict]]:
    """What the openai client's stream helpers build from deltas: content joined,
    tool calls keyed by index, the arguments strings concatenated."""
    content, calls = "", {}
    for d in deltas:
        content += d.get("content") or ""
        for tc in d.get("tool_calls", []):
            call = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in tc:
                assert call["id"] is None, "id sent twice"
                call["id"] = tc["id"]
                call["name"] = tc["function"]["name"]
            call["arguments"] += tc.get("function", {}).get("arguments", "")
    return content, [calls[i] for i in sorted(calls)]


def feed(tools: ToolCalling, text: str, cuts: list[int]) -> list[dict]:
    """The deltas of a stream fed ``text`` in pieces ending at ``cuts`` (as tokens
    arrive), then the end."""
    stream = ToolCallStream(tools)
    return [stream.update(text[:c], False) for c in cuts] + [stream.update(text, True)]


def splits(text: str) -> list[list[int]]:
    """Ways to cut ``text`` into tokens: one character each, and random pieces of
    1-6 characters (so cuts fall inside tags, names, escapes and multi-byte text)."""
    ways = [list(range(1, len(text)))]
    for seed in range(3):
        rng, cuts, at = random.Random(seed), [], 0
        while (at := at + rng.randint(1, 6)) < len(text):
            cuts.append(at)
        ways.append(cuts)
    return ways


@pytest.mark.parametrize("fmt", list(TEXTS))
def test_each_format_streams_incrementally_to_the_parsed_calls(fmt):
    text, content = TEXTS[fmt]
    tools = ToolCalling([WEATHER, TIME], "auto", format=fmt)
    got_content, calls = tools.parse(text)
    assert (got_content or "").strip() == (content or "")
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", json.loads(ARGS1)), ("get_time", json.loads(ARGS2))]
    for cuts in splits(text):
        deltas = feed(tools, text, cuts)
        assert accumulate(deltas) == (got_content or "", [
            {"id": accumulate(deltas)[1][i]["id"], "name": c.name, "arguments": c.arguments}
            for i, c in enumerate(calls)])
        entries = [tc for d in deltas for tc in d.get("tool_calls", [])]
        assert [e["index"] for e in entries] == sorted(e["index"] for e in entries)
        for i in range(len(calls)):  # the header, then several argument fragments
            mine = [e for e in entries if e["index"] == i]
            assert mine[0]["id"].startswith("call_") and mine[0]["function"] == {
                "name": calls[i].name, "arguments": ""}
            assert all("id" not in e for e in mine[1:]) and len(mine) > 3


# Arguments whose strings hold escapes, unicode and markup-like text: cuts fall
# inside "\"", "\\", "\u00e9", a raw emoji and a quoted "</tool_call>".
TRICKY = '{"q": "say \\"hi\\" \\\\ caf\\u00e9 \U0001f30d </tool_call> [x]", "n": [1, {"k": null}]}'


@pytest.mark.parametrize("fmt,text", [
    ("hermes", f'Ok \U0001f30d\n<tool_call>\n{{"name": "get_time", "arguments": {TRICKY}}}\n'
               f'</tool_call>\n<tool_call>{{"name": "get_weather", "arguments": {ARGS1}}}'
               '</tool_call>'),
    ("mistral", f'[TOOL_CALLS] [{{"name": "get_time", "arguments": {TRICKY}}}, '
                f'{{"name": "get_weather", "arguments": {ARGS1}}}]'),
    ("llama3", f'{{"name": "get_time", "parameters": {TRICKY}}};'
               f'{{"name": "get_weather", "parameters": {ARGS1}}}'),
])
def test_splits_inside_tags_and_json_strings_keep_the_arguments_exact(fmt, text):
    tools = ToolCalling([WEATHER, TIME], "auto", format=fmt)
    content, calls = tools.parse(text)
    assert [(c.name, c.arguments) for c in calls] == [("get_time", TRICKY),
                                                      ("get_weather", ARGS1)]
    assert json.loads(calls[0].arguments)["q"] == 'say "hi" \\ caf\u00e9 \U0001f30d </tool_call> [x]'
    for cuts in splits(text):
        s_content, s_calls = accumulate(feed(tools, text, cuts))
        assert s_content == (content or "")
        assert [(c["name"], c["arguments"]) for c in s_calls] == [
            (c.name, c.arguments) for c in calls]


def _both(tools: ToolCalling, text: str) -> tuple[tuple, tuple]:
    """(content, [(name, arguments)]) as parsed, and as a client reassembles the stream
    (fed one character at a time)."""
    content, calls = tools.parse(text)
    s_content, s_calls = accumulate(feed(tools, text, list(range(1, len(text)))))
    return ((content, [(c.name, c.arguments) for c in calls]),
            ((s_content or None) if s_calls else s_content,
             [(c["name"], c["arguments"]) for c in s_calls]))


@pytest.mark.parametrize("fmt", list(TEXTS))
def test_every_truncation_streams_what_parse_returns_and_no_markup(fmt):
    """Cut anywhere (max_tokens): the stream so far, then ended, reassembles to the
    non-streamed response of the same text; a cut call keeps its partial arguments."""
    text, _ = TEXTS[fmt]
    tools = ToolCalling([WEATHER, TIME], "auto", format=fmt)
    stream, deltas = ToolCallStream(tools), []
    for k in range(1, len(text) + 1):
        ended = copy.deepcopy(stream)
        content, calls = tools.parse(text[:k])
        s_content, s_calls = accumulate(deltas + [ended.update(text[:k], True)])
        assert ((s_content or None) if s_calls else s_content) == content
        assert [(c["name"], c["arguments"]) for c in s_calls] == [
            (c.name, c.arguments) for c in calls]
        assert "<tool_call>" not in s_content and "[TOOL_CALLS]" not in s_content
        for c in calls[:-1]:  # all but the last have closed
            json.loads(c.arguments)
        deltas.append(stream.update(text[:k], False))
    cut = TEXTS[fmt][0][:TEXTS[fmt][0].index(ARGS1) + 10]
    assert [(c.name, c.arguments) for c in tools.parse(cut)[1]] == [("get_weather", ARGS1[:10])]


def test_text_without_calls_is_content_and_streams_unchanged():
    tools = ToolCalling([WEATHER], "auto", format="hermes")
    text = "No tools needed <tool_ here, just text."
    assert tools.parse(text) == (text, [])
    assert _both(tools, text) == ((text, []),) * 2
    llama = ToolCalling([WEATHER], "auto", format="llama3")
    assert _both(llama, '{"answer": 42}') == (('{"answer": 42}', []),) * 2


def test_parallel_tool_calls_false_keeps_the_first():
    tools = ToolCalling([WEATHER, TIME], "auto", parallel=False, format="hermes")
    _, calls = tools.parse(TEXTS["hermes"][0])
    assert [c.name for c in calls] == ["get_weather"]


def test_required_and_named_constrain_to_the_parameter_schemas():
    named = ToolCalling([WEATHER, TIME], "get_time")
    assert json.loads(named.constraint.json) == TIME["function"]["parameters"]
    _, calls = named.parse(ARGS2)
    assert [(c.name, c.arguments) for c in calls] == [("get_time", ARGS2)]
    required = ToolCalling([WEATHER, TIME], "required", parallel=False)
    schema = json.loads(required.constraint.json)
    good = [{"name": "get_time", "parameters": {"zone": "UTC"}}]
    jsonschema.validate(good, schema)
    for bad in ([], [{"name": "get_time", "parameters": {}}],
                [{"name": "nope", "parameters": {"zone": "UTC"}}], good * 2):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    _, calls = required.parse(json.dumps(good))
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_time", {"zone": "UTC"})]
    assert ToolCalling([WEATHER], "auto").constraint is None


def test_format_follows_the_chat_template():
    assert detect_format("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_format("<tool_call>\n{{ tool_call | tojson }}") == "hermes"
    assert detect_format("<|start_header_id|>ipython<|end_header_id|>") == "llama3"
    assert detect_format(None) == "hermes"


def _nested_tool(name: str, leaf: dict) -> dict:
    """A tool whose parameters are what pydantic writes for a nested model: the
    inner model in ``$defs``, referenced as "#/$defs/Inner" (clashing across tools)."""
    return {"type": "function", "function": {"name": name, "parameters": {
        "$defs": {"Inner": {"type": "object", "properties": leaf,
                            "required": list(leaf), "additionalProperties": False}},
        "type": "object", "properties": {"inner": {"$ref": "#/$defs/Inner"},
                                         "more": {"type": "array",
                                                  "items": {"$ref": "#/$defs/Inner"}}},
        "required": ["inner", "more"], "additionalProperties": False}}}


def test_required_keeps_each_tools_defs_resolvable():
    tools = [_nested_tool("a", {"x": {"type": "integer"}}),
             _nested_tool("b", {"y": {"type": "string", "enum": ["$ref"]}})]
    required = ToolCalling(tools, "required")
    schema = json.loads(required.constraint.json)  # built (and compiled) without a ValueError
    good = [{"name": "a", "parameters": {"inner": {"x": 1}, "more": [{"x": 2}]}},
            {"name": "b", "parameters": {"inner": {"y": "$ref"}, "more": []}}]
    jsonschema.validate(good, schema)
    for bad in ([{"name": "a", "parameters": {"inner": {"y": "$ref"}, "more": []}}],
                [{"name": "b", "parameters": {"inner": {"y": "$ref"}, "more": [{"x": 1}]}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


CALL1 = f'<tool_call>\n{{"name": "get_weather", "arguments": {ARGS1}}}\n</tool_call>'
BAD = '<tool_call>\n{"name": "get_time", "arguments": {"zone": CET}}\n</tool_call>'


@pytest.mark.parametrize("text,parallel,want", [
    # truncated (max_tokens) mid-arguments: the call keeps its partial arguments
    (f'Hi {CALL1[:CALL1.index(ARGS1) + 6]}', True, ("Hi ", [("get_weather", '{"city')])),
    # ... before its name is known: no call, and the markup is not content
    (f'Hi {CALL1[:40]}', True, ("Hi ", [])),
    # malformed arguments are the model's text (with "auto" nothing checks them)
    (f'Hi {BAD}', True, ("Hi ", [("get_time", '{"zone": CET}')])),
    (f'Hi {CALL1}{BAD}', True, ("Hi ", [("get_weather", ARGS1), ("get_time", '{"zone": CET}')])),
    (f'Hi {BAD}{CALL1}', False, ("Hi ", [("get_time", '{"zone": CET}')])),
    # a tag closed inside unfinished arguments ends them (never JSON); no markup leaks
    ('x <tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>', True,
     ("x ", [("get_weather", '{"city": ')])),
    # a block with no call in it: no call, and its markup is not content either
    ('x <tool_call>not json</tool_call>', True, ("x ", [])),
    # keys in another order: the call is known (and sent whole) once its object closes
    (f'<tool_call>{{"arguments": {ARGS2}, "name": "get_time"}}</tool_call>', True,
     (None, [("get_time", json.dumps(json.loads(ARGS2)))])),
    # whitespace before a call is no content
    (f'\n {CALL1}', True, (None, [("get_weather", ARGS1)])),
    # a name with an escape JSON rejects, or a raw newline, is no call (was a crash: a 500)
    ('x <tool_call>{"name": "a\\q", "arguments": {}}</tool_call>', True, ("x ", [])),
    ('x <tool_call>{"name": "a\nb", "arguments": {}}</tool_call>', True, ("x ", [])),
])
def test_stream_and_parse_agree_on_malformed_and_truncated_calls(text, parallel, want):
    parsed, streamed = _both(ToolCalling([WEATHER, TIME], "auto", parallel=parallel), text)
    assert parsed == streamed == want


def test_named_call_streams_from_the_start_and_keeps_a_truncated_call():
    tools = ToolCalling([WEATHER, TIME], "get_time")
    assert _both(tools, ARGS2[:-3]) == ((None, [("get_time", ARGS2[:-3])]),) * 2
    assert _both(tools, ARGS2) == ((None, [("get_time", ARGS2)]),) * 2
    first = ToolCallStream(tools).update("{", False)["tool_calls"]
    assert first[0]["function"] == {"name": "get_time", "arguments": ""}
    assert first[1] == {"index": 0, "function": {"arguments": "{"}}
    required = ToolCalling([WEATHER, TIME], "required")
    text = f'[{{"name": "get_time", "parameters": {ARGS2}}}, {{"name": "get_weather", "parameters": '
    assert _both(required, text) == ((None, [("get_time", ARGS2)]),) * 2  # name not yet known
    assert _both(required, text + '{"ci') == (
        (None, [("get_time", ARGS2), ("get_weather", '{"ci')]),) * 2
