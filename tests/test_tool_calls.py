"""Tool calls: parsed from each family's format, streamed as deltas that the
official client's accumulation turns into the non-streamed calls, and the
constraints "required" and a named function put on decoding."""

from __future__ import annotations

import json

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


@pytest.mark.parametrize("fmt", list(TEXTS))
def test_each_format_parses_and_streams_to_the_same_calls(fmt):
    text, content = TEXTS[fmt]
    tools = ToolCalling([WEATHER, TIME], "auto", format=fmt)
    got_content, calls = tools.parse(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", json.loads(ARGS1)), ("get_time", json.loads(ARGS2))]
    stream = ToolCallStream(tools)
    deltas = [stream.update(text[:i], False) for i in range(1, len(text))]
    deltas.append(stream.update(text, True))
    s_content, s_calls = accumulate(deltas)
    assert s_content.strip() == (content or "")
    assert [(c["name"], c["arguments"]) for c in s_calls] == [(c.name, c.arguments)
                                                               for c in calls]
    first = next(d for d in deltas if "tool_calls" in d)["tool_calls"][0]
    assert first["id"].startswith("call_") and first["function"] == {
        "name": "get_weather", "arguments": ""}  # the header comes before any argument
    sent = [len(d.get("tool_calls", [])) for d in deltas if d.get("tool_calls")]
    assert sent == [2, 2]  # each call once it closed and parsed: header, then arguments
    assert "<tool_call" not in s_content and "[TOOL_CALLS" not in s_content


def test_text_without_calls_is_content_and_streams_unchanged():
    tools = ToolCalling([WEATHER], "auto", format="hermes")
    text = "No tools needed <tool_ here, just text."
    assert tools.parse(text) == (text, [])
    stream = ToolCallStream(tools)
    deltas = [stream.update(text[:i], i == len(text)) for i in range(1, len(text) + 1)]
    assert accumulate(deltas) == (text, [])
    broken = 'x <tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'
    assert tools.parse(broken) == (broken, [])  # calls that do not parse stay text


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


def _both(tools: ToolCalling, text: str) -> tuple[tuple, tuple]:
    """(content, [(name, arguments)]) as parsed, and as a client reassembles the stream."""
    content, calls = tools.parse(text)
    stream = ToolCallStream(tools)
    deltas = [stream.update(text[:i], i == len(text)) for i in range(1, len(text) + 1)]
    s_content, s_calls = accumulate(deltas)
    return ((content, [(c.name, c.arguments) for c in calls]),
            (s_content.strip() or None if s_calls else s_content,
             [(c["name"], c["arguments"]) for c in s_calls]))


CALL1 = f'<tool_call>\n{{"name": "get_weather", "arguments": {ARGS1}}}\n</tool_call>'
BAD = '<tool_call>\n{"name": "get_time", "arguments": {"zone": CET}}\n</tool_call>'


@pytest.mark.parametrize("text,parallel,want", [
    # truncated (max_tokens) mid-arguments: no call anywhere, all of it is content
    (f'Hi {CALL1[:40]}', True, (f'Hi {CALL1[:40]}', [])),
    # malformed arguments: the same
    (f'Hi {BAD}', True, (f'Hi {BAD}', [])),
    # a malformed second call does not drop a valid first one, parallel or not
    (f'Hi {CALL1}{BAD}', True, ("Hi", [("get_weather", ARGS1)])),
    (f'Hi {CALL1}{BAD}', False, ("Hi", [("get_weather", ARGS1)])),
    (f'Hi {BAD}{CALL1}', False, ("Hi", [("get_weather", ARGS1)])),
])
def test_stream_and_parse_agree_on_malformed_and_truncated_calls(text, parallel, want):
    parsed, streamed = _both(ToolCalling([WEATHER, TIME], "auto", parallel=parallel), text)
    assert parsed == streamed == want


def test_named_call_truncated_by_length_streams_no_call():
    tools = ToolCalling([WEATHER, TIME], "get_time")
    assert _both(tools, ARGS2[:-3]) == ((ARGS2[:-3], []), (ARGS2[:-3], []))
    assert _both(tools, ARGS2) == ((None, [("get_time", ARGS2)]),) * 2
