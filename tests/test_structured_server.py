"""Structured outputs and tool calls over HTTP, with the official `openai` client
against the in-process server on the random-weight ``tiny`` model: every
constrained output parses and validates (the mask alone guarantees it),
streamed or not, with ``n`` > 1; tool calls reassembled by the client; bad
constraints are 400s naming the field."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pydantic
import pytest
from test_server import KEY, LiveServer, assert_error



AUTH = {"Authorization": f"Bearer {KEY}"}
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "maxItems": 2, "items": {"type": "object", "properties": {
        "kind": {"type": "string", "enum": ["cat", "dog"]},
        "legs": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["kind", "legs"], "additionalProperties": False}}},
    "required": ["name", "age", "pets"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"type": "string", "enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HEAVY = "(a{300}){300}"  # a lexer of millions of expressions (test_structured_engine)
HEAVY_SCHEMA = {"type": "object", "properties": {"s": {"type": "string",
                                                      "pattern": f"^{HEAVY}$"}},
                "required": ["s"], "additionalProperties": False}
SAMPLED = dict(temperature=1.0, seed=7, max_tokens=120)


class Pet(pydantic.BaseModel):
    kind: str = pydantic.Field(pattern="^(cat|dog)$")
    legs: int = pydantic.Field(ge=0, le=9)


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=6)
    age: int = pydantic.Field(ge=0, le=120)
    pets: list[Pet] = pydantic.Field(max_length=2)


@pytest.fixture(scope="module")
def live(tiny):
    srv = LiveServer(tiny, dict(api_key=KEY), {})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(live):
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=60) as c:
        yield c


def test_response_format_pydantic_model_through_parse(client, live):
    r = client.chat.completions.parse(model="tiny", messages=ASK, response_format=Person, n=3,
                                      **SAMPLED)
    assert len(r.choices) == 3
    for c in r.choices:
        assert c.finish_reason == "stop", c
        assert isinstance(c.message.parsed, Person)  # the client validated it
        jsonschema.validate(json.loads(c.message.content), Person.model_json_schema())
    assert len({c.message.content for c in r.choices}) > 1  # sampled, not one fixed answer
    live.wait_idle()


def test_json_object_and_streamed_json_schema(client, live):
    r = client.chat.completions.create(model="tiny", messages=ASK, n=2,
                                       response_format={"type": "json_object"}, **SAMPLED)
    for c in r.choices:
        assert c.finish_reason == "stop" and isinstance(json.loads(c.message.content), dict)
    stream = client.chat.completions.create(
        model="tiny", messages=ASK, n=2, stream=True, **SAMPLED,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    texts, finish = ["", ""], [None, None]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    assert finish == ["stop", "stop"]
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    live.wait_idle()


def test_completions_take_vllms_guided_fields_both_spellings(client, live):
    for extra in ({"guided_regex": r"[0-9]{3}-[a-z]{2,5}"},
                  {"structured_outputs": {"regex": r"[0-9]{3}-[a-z]{2,5}",  # vLLM's backend
                                          "backend": "xgrammar", "disable_fallback": True,
                                          "disable_any_whitespace": True,  # options: ignored
                                          "disable_additional_properties": False,
                                          "whitespace_pattern": None}}):
        r = client.completions.create(model="tiny", prompt="Code:", n=3, extra_body=extra,
                                      **SAMPLED)
        for c in r.choices:
            assert c.finish_reason == "stop"
            assert len(c.text) >= 6 and c.text[:3].isdigit() and c.text[3] == "-"
            assert c.text[4:].isalpha() and c.text[4:].islower() and len(c.text) <= 9
    chunks = client.completions.create(model="tiny", prompt="Pick:", n=4, stream=True,
                                       extra_body={"guided_choice": ["red", "green", "blue"]},
                                       **SAMPLED)
    texts = ["", "", "", ""]
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert set(texts) <= {"red", "green", "blue"}
    r = client.completions.create(model="tiny", prompt="Say:", extra_body={
        "guided_grammar": 'start: "yes" | "no" | "maybe " num\nnum: /[0-9]/'}, **SAMPLED)
    assert r.choices[0].text in ("yes", "no") or r.choices[0].text[:-1] == "maybe "
    live.wait_idle()


def test_constraints_are_compiled_at_intake_not_in_the_engine_step(client, live, compile_threads):
    """The costly compile (the matcher and its first mask) happens on the server's
    worker thread; the engine's step finds it cached (it used to compile there,
    stalling every other request's step)."""
    misses = compile_threads
    for extra in ({"guided_regex": "[0-9]{2}-intake"},
                  {"response_format": {"type": "json_schema", "json_schema": {
                      "name": "p", "schema": {**PERSON, "title": "intake"}}}}):
        r = client.chat.completions.create(model="tiny", messages=ASK, extra_body=extra,
                                           **SAMPLED)
        assert r.choices[0].finish_reason == "stop"
    assert len(misses) == 2 and all(name.startswith("sluice-http") for name in misses), misses
    live.wait_idle()


def test_a_grammar_with_no_allowed_token_ends_its_completion_only(client, live, http):
    """An unsatisfiable constraint (an empty character class) ends its completion
    with finish_reason "error" and says why; a request beside it is unaffected."""
    stuck = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 20,
                                               "guided_regex": "x[a&&b]"})
    assert stuck.status_code == 200, stuck.text
    (c,) = stuck.json()["choices"]
    assert c["finish_reason"] == "error" and "grammar" in c["stop_reason"]
    ok = client.completions.create(model="tiny", prompt="x", max_tokens=5, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert ok.choices[0].finish_reason == "length"
    live.wait_idle()  # nothing leaks


def _check_call(call, tool: dict) -> None:
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_named_and_required_tool_choice(client, live):
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, CLOCK],
                                       tool_choice=named, n=2, **SAMPLED)
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        (call,) = c.message.tool_calls
        _check_call(call, WEATHER)
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, CLOCK],
                                       tool_choice="required", parallel_tool_calls=False,
                                       **SAMPLED)
    (call,) = r.choices[0].message.tool_calls
    _check_call(call, {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name])
    live.wait_idle()


class Street(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)


class Address(pydantic.BaseModel):
    street: Street
    number: int = pydantic.Field(ge=1, le=99)


def test_required_tool_with_a_nested_pydantic_model(client, live):
    """pydantic writes a nested model as "$defs" + "$ref"; "required" still
    constrains (and validates) the call (it was a 500)."""
    schema = Address.model_json_schema()
    assert "$defs" in schema
    tool = {"type": "function", "function": {"name": "mail", "parameters": schema}}
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[tool, CLOCK],
                                       tool_choice="required", parallel_tool_calls=False,
                                       **SAMPLED)
    (call,) = r.choices[0].message.tool_calls
    if call.function.name == "mail":
        Address.model_validate_json(call.function.arguments)
    else:
        _check_call(call, CLOCK)
    live.wait_idle()


NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize("choice,max_tokens", [("required", 120), (NAMED, 120), (NAMED, 5)])
def test_streamed_tool_calls_reassemble_to_the_non_streamed_calls(client, live, choice,
                                                                  max_tokens):
    """Greedy, streamed and not: the client's reassembly of the stream (header
    first, then several argument fragments per call) is the non-streamed response;
    cut by max_tokens, both keep the partial call with finish_reason "length"."""
    kw = dict(model="tiny", messages=ASK, tools=[WEATHER, CLOCK], tool_choice=choice,
              parallel_tool_calls=False, temperature=0.0, max_tokens=max_tokens)
    full = client.chat.completions.create(**kw).choices[0]
    with client.chat.completions.stream(**kw) as stream:
        chunks = [e.chunk for e in stream if e.type == "chunk"]
        # the client's own reassembly (get_final_completion refuses a "length" finish)
        final = stream.current_completion_snapshot.choices[0]
    assert final.finish_reason == full.finish_reason
    assert full.finish_reason == ("length" if max_tokens == 5 else "tool_calls")
    assert full.message.content is None and not final.message.content
    calls = [(c.function.name, c.function.arguments) for c in full.message.tool_calls]
    assert calls and [(c.function.name, c.function.arguments)
                      for c in final.message.tool_calls] == calls
    entries = [tc for ch in chunks for c in ch.choices for tc in c.delta.tool_calls or []]
    for i, (name, arguments) in enumerate(calls):
        mine = [e for e in entries if e.index == i]
        assert mine[0].id.startswith("call_") and mine[0].function.name == name
        assert mine[0].function.arguments == ""  # the name first
        assert all(e.id is None for e in mine[1:])
        if i == 0:  # the arguments arrive as they are decoded, not in one piece
            assert len([e for e in mine[1:] if e.function.arguments]) > 1
        if full.finish_reason == "tool_calls":
            _check_call(full.message.tool_calls[i], {"get_weather": WEATHER,
                                                     "get_time": CLOCK}[name])
    live.wait_idle()


def test_auto_tool_calls_are_parsed_from_the_hermes_format(client, live):
    """With "auto" the model writes what it likes; a regex makes the random model
    write a Hermes call, which the server returns as tool_calls, streamed or not."""
    forced = {"guided_regex": r'<tool_call>\n\{"name": "get_time", "arguments": '
                              r'\{"zone": "(UTC|CET)"\}\}\n</tool_call>'}
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, CLOCK],
                                       extra_body=forced, **SAMPLED)
    (call,) = r.choices[0].message.tool_calls
    _check_call(call, CLOCK)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, stream=True,
                                                 tools=[WEATHER, CLOCK], extra_body=forced,
                                                 **SAMPLED))
    args = "".join(tc.function.arguments or "" for ch in chunks for c in ch.choices
                   for tc in c.delta.tool_calls or [])
    assert args == call.function.arguments
    fragments = [tc.function.arguments for ch in chunks for c in ch.choices
                 for tc in c.delta.tool_calls or [] if tc.function.arguments]
    assert len(fragments) > 1  # streamed as decoded
    assert not any(c.delta.content for ch in chunks for c in ch.choices)  # no markup leaks
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    live.wait_idle()


def test_tool_calls_are_parsed_in_the_format_of_the_template_that_renders(client, live,
                                                                         monkeypatch):
    """A model whose 'tool_use' template (the one chats with tools render through)
    writes Mistral calls while its default one does not: calls parse as Mistral."""
    tok = live.server.tokenizer
    assert "[TOOL_CALLS]" not in tok.chat_template
    monkeypatch.setitem(tok.chat_templates, "tool_use", "{% for m in messages %}"
                        "{{ m['content'] }}{% endfor %}{{ '[TOOL_CALLS]' if tools }}")
    forced = {"guided_regex": r'\[TOOL_CALLS\] \[\{"name": "get_time", "arguments": '
                              r'\{"zone": "(UTC|CET)"\}\}\]'}
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, CLOCK],
                                       extra_body=forced, **SAMPLED)
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    _check_call(call, CLOCK)
    live.wait_idle()


def test_tool_results_round_trip_through_the_template(http):
    """An assistant turn with tool_calls and a role "tool" reply render (the
    tiny model's template prints contents) and generate."""
    msgs = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"}]
    r = http.post("/v1/chat/completions", json={"messages": msgs, "tools": [WEATHER],
                                                "max_tokens": 3})
    assert r.status_code == 200, r.text
    bad = [*msgs[:1], {**msgs[1], "tool_calls": [{**msgs[1]["tool_calls"][0], "function": {
        "name": "get_weather", "arguments": "{not json"}}]}]
    assert_error(http.post("/v1/chat/completions", json={"messages": bad, "max_tokens": 2}),
                 400, "messages[1].tool_calls[0].function.arguments")


CHAT = {"messages": ASK, "max_tokens": 4}
JS = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {**CHAT, "response_format": JS},
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", {**CHAT, "response_format": {**JS, "json_schema": {
        "name": "x", "schema": {"type": "object", "dependentSchemas": {"a": {}}}}}},
     "response_format.json_schema.schema"),  # a keyword the engine does not implement
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}},
     "response_format.type"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}},
     "response_format.json_schema"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "[a-"}, "guided_regex"),
    ("/v1/completions", {"prompt": "x", "guided_grammar": "start: ((("}, "guided_grammar"),
    ("/v1/completions", {"prompt": "x", "guided_json": "{oops"}, "guided_json"),
    ("/v1/completions", {"prompt": "x", "guided_choice": []}, "guided_choice"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "("}},
     "structured_outputs"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"colour": "red"}},
     "structured_outputs"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"},
                              "guided_regex": "a"}, "guided_regex"),
    ("/v1/chat/completions", {**CHAT, "tools": [WEATHER], "tool_choice": {
        "type": "function", "function": {"name": "launch"}}}, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "tools": [WEATHER], "tool_choice": "required",
                              "response_format": {"type": "json_object"}}, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "foo"}}}], "tool_choice": "required"},
     "tools[0].function.parameters"),
    ("/v1/chat/completions", {**CHAT, "tools": [WEATHER, WEATHER]}, "tools"),
    # over llguidance's parser limits (`PARSER_LIMITS`), found by the compile's probe:
    # they used to be accepted and end with finish_reason "error"
    ("/v1/completions", {"prompt": "x", "guided_regex": HEAVY}, "guided_regex"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": HEAVY}},
     "structured_outputs"),
    ("/v1/chat/completions", {**CHAT, "response_format": {**JS, "json_schema": {
        "name": "x", "schema": HEAVY_SCHEMA}}}, "response_format"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": HEAVY_SCHEMA}}]},
     "tools"),
])
def test_bad_constraints_are_400s_naming_the_field(live, http, path, body, param):
    r = http.post(path, json=body)
    assert_error(r, 400, param)
    if HEAVY in json.dumps(body):
        assert "too many expressions" in r.json()["error"]["message"]
    live.wait_idle()
