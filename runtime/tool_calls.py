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
  model writes what it likes and `scan` finds calls in its family's format.
- `ToolCalling.scan(text)`: the one parser both paths use, so they agree by
  construction. A call exists from the moment its name is known (``{"name": "...",
  "arguments": `` followed by the ``{`` or ``[`` that opens the arguments; a call
  whose keys come in another order is known only once its object closes); its
  ``arguments`` are the model's own JSON text of the arguments value so far, up to
  where that value closes (or breaks: a ``<`` outside a string, as a closing
  ``</tool_call>`` written too early, is never JSON). As the text grows, a call's
  arguments only grow, which is what lets them stream.
- `parse(text) -> (content, calls)`: the finished text's content and `ToolCall`s.
  A call cut short (``max_tokens``) keeps its partial arguments, as OpenAI's does
  (the finish reason stays ``"length"``); with ``"auto"`` the arguments are not
  checked (as OpenAI's: the model may write invalid JSON). With ``"required"`` or a
  named function decoding is constrained, so a call that ends normally has valid
  arguments of its schema. ``parallel_tool_calls: false`` keeps the first call.
- `ToolCallStream`: per streamed choice, ``update(text, final)`` turns the text so
  far into the next ``delta``: content before the first call as it is decoded; a
  new call's ``index``, ``id``, ``type`` and ``function.name`` (arguments ``""``)
  as soon as its name is known; then each new piece of its arguments' text. The
  official client's reassembly (concatenating each index's arguments) gives
  exactly `parse`'s calls and content. Markup (``<tool_call>``, ``[TOOL_CALLS]``,
  or a prefix that may become one) is never sent as content: from the first
  marker on, the text is the calls'.

Content: the text before the first call's markup; with calls, ``None`` when it is
only whitespace (the stream holds whitespace back until something else comes);
with no call at all, all of the text (for ``llama3``, a reply that opens with
``{`` is held back until it is known to be a call or the text ends).

Formats (`FORMATS`, picked from the chat template's text by `detect_format`):

- ``hermes`` (Hermes, Qwen 2/2.5/3): ``<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>``, one block per call, content before the first;
- ``mistral``: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]``;
- ``llama3`` (Llama 3.1+ JSON calls): the whole reply is ``{"name": ...,
  "parameters": {...}}`` (several separated by ``;``); ``<|python_tag|>`` is a
  special token, gone from decoded text.

`scan` re-reads the text so far on each streamed update (linear in a reply of at
most a few thousand characters) rather than keeping a second, resumable parser:
one parser is what makes the stream and the response agree.
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
    """A call as far as the text goes: its name, and its arguments' text so far."""

    name: str
    arguments: str


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# A JSON text's pieces: a whole string, a string the text stops inside (a lone
# quote), a bracket, a "<", or a run of anything else (read in C, not per character:
# a stream re-reads its text on every token).
_PIECES = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|"|[{}\[\]<]|[^"{}\[\]<]+', re.DOTALL)


def _value_end(text: str, i: int) -> int | None:
    """Where the JSON object or array starting at ``text[i]`` ends: after its
    closing bracket, or at a ``<`` outside a string (never JSON: markup such as
    ``</tool_call>`` ends a broken value); None if the text stops first."""
    depth = 0
    for m in _PIECES.finditer(text, i):
        c = m.group()
        if c == '"':
            return None
        if c == "<":
            return m.start()
        if c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return m.end()
    return None


def _call_at(body: str, i: int) -> tuple[_Partial | None, int | None]:
    """The call object at ``body[i]`` (a ``{``) and where it ends (None: unfinished).
    The call is None while its name is not known yet, or for good if the object
    closed without one."""
    end = _value_end(body, i)
    m = _NAME.match(body, i)
    if m is not None and m.end() < len(body) and body[m.end()] in "{[":
        try:  # the model's own text: an escape JSON rejects is no name
            name = json.loads(f'"{m.group(1)}"')
        except json.JSONDecodeError:
            return None, end
        start = m.end()
        args_end = _value_end(body, start)
        return _Partial(name, body[start:len(body) if args_end is None else args_end]), end
    if end is None:
        return None, None
    try:  # keys in another order: only the whole object tells
        obj = json.loads(body[i:end])
        name, args = obj["name"], obj.get("arguments", obj.get("parameters", {}))
    except (json.JSONDecodeError, KeyError, TypeError):
        return None, end
    if not isinstance(name, str):
        return None, end
    return _Partial(name, json.dumps(args, ensure_ascii=False)), end


def _calls_in(body: str, i: int = 0) -> tuple[list[_Partial], int | None]:
    """The call objects of ``body`` from ``i``: one, several separated by ``,``/``;``,
    or an array of them; and where they stop (None: inside an unfinished one)."""
    calls: list[_Partial] = []
    while True:
        while i < len(body) and body[i] in " \t\r\n[,;]":
            i += 1
        if i >= len(body) or body[i] != "{":
            return calls, i
        call, end = _call_at(body, i)
        if call is not None:
            calls.append(call)
        if end is None:
            return calls, None
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

    def scan(self, text: str) -> tuple[str, int, list[_Partial]]:
        """Content so far, how many of its last characters a stream holds back (they
        may begin a call, or are whitespace before one), and the calls so far, in
        order (the first only without parallel_tool_calls). Module docstring."""
        content, hold, calls = self._scan(text)
        if not content[:len(content) - hold].strip():
            hold = len(content)
        return content, hold, calls if self.parallel else calls[:1]

    def _scan(self, text: str) -> tuple[str, int, list[_Partial]]:
        if self.named is not None:
            return "", 0, [_Partial(self.named, text.lstrip())]
        if self.choice == "required":
            return "", 0, _calls_in(text)[0]
        if self.format == "llama3":
            if not text.lstrip().startswith("{"):
                return text, 0, []
            calls = _calls_in(text)[0]
            return ("", 0, calls) if calls else (text, len(text), [])
        marker = _MARKERS[self.format]
        head, found, _ = text.partition(marker)
        if not found:
            return head, _held_back(head, marker), []
        if self.format == "mistral":
            return head, 0, _calls_in(text, len(head) + len(marker))[0]
        calls: list[_Partial] = []
        at: int | None = len(head)
        while at is not None and (at := text.find(marker, at)) >= 0:
            block, at = _calls_in(text, at + len(marker))
            calls.extend(block)
        return head, 0, calls

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The finished text's content (None when there are calls and it is only
        whitespace) and calls (module docstring)."""
        content, _, calls = self.scan(text)
        if not calls:
            return content, []
        return content if content.strip() else None, [
            ToolCall(new_call_id(), p.name, p.arguments) for p in calls]


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


class ToolCallStream:
    """One streamed choice's deltas (module docstring)."""

    def __init__(self, tools: ToolCalling):
        self.tools = tools
        self.content_sent = 0
        self.ids: list[str] = []  # per call sent
        self.arguments_sent: list[int] = []  # characters of each call's arguments sent

    def update(self, text: str, final: bool) -> dict[str, Any]:
        """The delta that brings the client from what it has to ``text`` (all of the
        choice's text so far); ``final`` releases held-back content (whitespace
        before calls stays unsent, as `ToolCalling.parse` makes it None)."""
        content, hold, calls = self.tools.scan(text)
        if final and (not calls or content.strip()):
            hold = 0
        visible = content[:len(content) - hold]
        delta: dict[str, Any] = {}
        if len(visible) > self.content_sent:
            delta["content"] = visible[self.content_sent:]
            self.content_sent = len(visible)
        out = []
        for i, call in enumerate(calls):
            if i == len(self.ids):  # the header first, as soon as the name is known
                self.ids.append(new_call_id())
                self.arguments_sent.append(0)
                out.append({"index": i, "id": self.ids[i], "type": "function",
                            "function": {"name": call.name, "arguments": ""}})
            if len(call.arguments) > self.arguments_sent[i]:
                out.append({"index": i, "function": {
                    "arguments": call.arguments[self.arguments_sent[i]:]}})
                self.arguments_sent[i] = len(call.arguments)
        if out:
            delta["tool_calls"] = out
        return delta

    @property
    def called(self) -> bool:
        return bool(self.ids)
