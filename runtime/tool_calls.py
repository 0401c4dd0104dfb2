"""Tool calling: which calls a chat completion makes, in the formats model
families write them, as OpenAI's ``message.tool_calls`` and streamed
``delta.tool_calls``.

Interface:

- `ToolCalling`: a request's tools and ``tool_choice`` (checked by
  `sluice.runtime.openai_protocol`). ``constraint`` is the `StructuredOutputs` that
  ``"required"`` or a named function imposes on decoding (vLLM's design): a named
  function's output is its arguments, a JSON object of its parameter schema;
  ``"required"`` outputs a JSON array of ``{"name", "parameters"}`` objects, one of
  the tools each (``parallel_tool_calls: false``: exactly one). With ``"auto"`` the
  model writes what it likes and `parse` finds calls in its family's format.
- `parse(text) -> (content, calls)`: the finished text's content and `ToolCall`s:
  the calls that closed and whose arguments parse (malformed or truncated ones are
  dropped; ``parallel_tool_calls: false`` keeps the first of them); text with no
  such call is all content.
- `ToolCallStream`: per streamed choice, ``update(text, final)`` turns the text so
  far into the next ``delta`` (content and/or ``tool_calls``) by the same rule: a
  call is sent once it has closed and parses, as a ``delta.tool_calls`` entry with
  its ``index``, ``id``, ``type`` and ``function.name`` (arguments ``""``) followed
  by one with its ``arguments``, so the official client reassembles exactly the
  non-streamed response (the same calls, content and finish reason), never a call
  the final text does not bear out.

Formats (`FORMATS`, picked from the chat template's text by `detect_format`):

- ``hermes`` (Hermes, Qwen 2/2.5/3): ``<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>``, one block per call, content before the first;
- ``mistral``: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]``;
- ``llama3`` (Llama 3.1+ JSON calls): the whole reply is ``{"name": ...,
  "parameters": {...}}`` (several separated by ``;``); ``<|python_tag|>`` is a
  special token, gone from decoded text.

A call's ``arguments`` string is the model's own JSON text of the arguments
object, checked to parse (as OpenAI, Sluice does not check it against the
schema when decoding was not constrained).
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any

from sluice.runtime.structured_output import StructuredOutputs

FORMATS = ("hermes", "mistral", "llama3")
_MARKERS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}
_HERMES_END = "</tool_call>"
_NAME = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def detect_format(chat_template: str | None) -> str:
    """The tool-call format a chat template teaches its model (hermes if none shows)."""
    text = chat_template or ""
    if "[TOOL_CALLS]" in text:
        return "mistral"
    if "<tool_call>" in text:
        return "hermes"
    if "<|python_tag|>" in text or "ipython" in text:
        return "llama3"
    return "hermes"


@dataclasses.dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of the arguments object

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclasses.dataclass
class _Partial:
    """A call as far as the text goes: its name once complete, the arguments text
    so far, and whether the whole call object has closed."""

    name: str | None
    arguments: str
    complete: bool


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _value_end(text: str, i: int) -> int | None:
    """The end of the JSON object or array starting at ``text[i]``, None if the
    text stops first."""
    depth, in_string, escaped = 0, False, False
    for j in range(i, len(text)):
        c = text[j]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
    return None


def _partial_call(body: str, i: int) -> tuple[_Partial, int | None]:
    """The call object at ``body[i]`` (a ``{``) and where it ends (None: unfinished)."""
    end = _value_end(body, i)
    m = _NAME.match(body, i)
    if m is not None:
        start = m.end()
        if start < len(body) and body[start] in "{[":
            args_end = _value_end(body, start)
            args = body[start:args_end if args_end is not None else len(body)]
            name = json.loads(f'"{m.group(1)}"')
            return _Partial(name, args, end is not None and args_end is not None), end
    if end is None:
        return _Partial(None, "", False), None
    try:  # keys in another order: only the whole object tells
        obj = json.loads(body[i:end])
        args = obj.get("arguments", obj.get("parameters", {}))
        name = obj["name"]
    except (json.JSONDecodeError, KeyError, AttributeError):
        return _Partial(None, "", True), end
    if not isinstance(name, str):
        return _Partial(None, "", True), end
    return _Partial(name, json.dumps(args, ensure_ascii=False), True), end


def _calls_in(body: str) -> list[_Partial]:
    """The call objects of ``body``: one, several separated by ``,``/``;``, or an
    array of them."""
    calls: list[_Partial] = []
    i = 0
    while True:
        while i < len(body) and body[i] in " \t\r\n[,;]":
            i += 1
        if i >= len(body) or body[i] != "{":
            return calls
        call, end = _partial_call(body, i)
        calls.append(call)
        if end is None:
            return calls
        i = end


def _held_back(content: str, marker: str) -> int:
    """How many trailing characters of ``content`` could begin ``marker``."""
    for k in range(min(len(marker) - 1, len(content)), 0, -1):
        if marker.startswith(content[-k:]):
            return k
    return 0


@dataclasses.dataclass
class ToolCalling:
    """A chat request's tools (OpenAI ``tools`` entries) and choice; see the module
    docstring. ``choice``: "auto", "required" or a function's name."""

    tools: list[dict[str, Any]]
    choice: str
    parallel: bool = True
    format: str = "hermes"

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    def parameters(self, name: str) -> dict[str, Any]:
        fn = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        return fn.get("parameters") or {"type": "object"}

    @property
    def named(self) -> str | None:
        return None if self.choice in ("auto", "required") else self.choice

    @property
    def constraint(self) -> StructuredOutputs | None:
        if self.named is not None:
            return StructuredOutputs(json=self.parameters(self.named))
        if self.choice != "required":
            return None
        # Each tool's schema goes under the root's $defs (its own refs rewritten to
        # point there), so a "#/$defs/X" of pydantic's nested models still resolves.
        defs = {f"tool_{i}": _rebased(self.parameters(name), f"#/$defs/tool_{i}")
                for i, name in enumerate(self.names)}
        items = {"anyOf": [{"type": "object", "properties": {
            "name": {"type": "string", "enum": [name]},
            "parameters": {"$ref": f"#/$defs/tool_{i}"}},
            "required": ["name", "parameters"], "additionalProperties": False}
            for i, name in enumerate(self.names)]}
        schema = {"$defs": defs, "type": "array", "items": items, "minItems": 1}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutputs(json=schema)

    def _partials(self, text: str) -> tuple[str, int, list[_Partial]]:
        """Content so far, how many of its last characters to hold back (they may
        start a call), and the calls so far."""
        if self.named is not None:
            return "", 0, [_Partial(self.named, text.lstrip(), False)]
        if self.choice == "required":
            return "", 0, _calls_in(text)
        if self.format == "llama3":
            stripped = text.lstrip()
            if not stripped:
                return "", 0, []
            if stripped.startswith("{"):
                return "", 0, _calls_in(stripped)
            return text, 0, []
        marker = _MARKERS[self.format]
        head, found, rest = text.partition(marker)
        if not found:
            return head, _held_back(head, marker), []
        if self.format == "mistral":
            return head, 0, _calls_in(rest)
        calls = []
        for block in text[len(head):].split(marker)[1:]:
            calls.extend(_calls_in(block.split(_HERMES_END, 1)[0]))
        return head, 0, calls

    def settled(self, text: str, final: bool) -> tuple[str, int, list[_Partial]]:
        """Content so far, how many of its last characters to hold back, and the calls
        that have closed and whose arguments parse, in order (the first only without
        parallel_tool_calls); a malformed or unfinished call is never one of them,
        streamed or not, so both give the same calls."""
        content, hold, partials = self._partials(text)
        if self.named is not None and final:
            partials[0].complete = True
        calls = [p for p in partials
                 if p.name is not None and p.complete and _is_json(p.arguments)]
        return content, hold, calls if self.parallel else calls[:1]

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The finished text's content (None when it is only calls) and calls; text
        with no call that parses is all content."""
        content, _, calls = self.settled(text, True)
        if not calls:
            return text, []
        return content.strip() or None, [ToolCall(new_call_id(), p.name, p.arguments)
                                         for p in calls]


_LITERAL_KEYWORDS = ("const", "enum", "default", "examples")  # values, not schemas
_NAMED_SCHEMAS = ("properties", "patternProperties", "$defs", "definitions",
                  "dependentSchemas")  # name -> schema maps


def _rebased(schema: Any, root: str) -> Any:
    """``schema`` with its document-local refs ("#", "#/$defs/X", "#/properties/..")
    rewritten to point under ``root``, where the combined schema places it."""
    if isinstance(schema, list):
        return [_rebased(v, root) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = root + value[1:]
        elif key in _LITERAL_KEYWORDS:
            out[key] = value
        elif key in _NAMED_SCHEMAS and isinstance(value, dict):  # names are not keywords
            out[key] = {name: _rebased(v, root) for name, v in value.items()}
        else:
            out[key] = _rebased(value, root)
    return out


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


class ToolCallStream:
    """One streamed choice's deltas (module docstring)."""

    def __init__(self, tools: ToolCalling):
        self.tools = tools
        self.content_sent = 0
        self.ids: list[str] = []  # per call sent

    def update(self, text: str, final: bool) -> dict[str, Any]:
        """The delta that brings the client from what it has to ``text`` (all of the
        choice's text so far); ``final`` releases held-back content, and all of the
        text when no call parsed (as `ToolCalling.parse`)."""
        content, hold, calls = self.tools.settled(text, final)
        visible = text if final and not calls else content[:len(content) - hold]
        delta: dict[str, Any] = {}
        if len(visible) > self.content_sent:
            delta["content"] = visible[self.content_sent:]
            self.content_sent = len(visible)
        out = []
        for i in range(len(self.ids), len(calls)):  # the header, then the arguments
            self.ids.append(new_call_id())
            out.append({"index": i, "id": self.ids[i], "type": "function",
                        "function": {"name": calls[i].name, "arguments": ""}})
            out.append({"index": i, "function": {"arguments": calls[i].arguments}})
        if out:
            delta["tool_calls"] = out
        return delta

    @property
    def called(self) -> bool:
        return bool(self.ids)
