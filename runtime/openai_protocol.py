"""OpenAI API request schemas, their mapping to `SamplingParams`, and the
response and error objects the server sends.

Requests are pydantic models validated in strict JSON mode, so ``"max_tokens":
"5"`` or ``"stream": 1`` is a 400 rather than a silent coercion (as OpenAI
does). Unknown fields are ignored (as vLLM does, so clients that send newer
OpenAI fields keep working); known fields that Sluice cannot honour
(``logit_bias``, ``suffix``, ``best_of`` != n, non-text content parts,
``prompt_logprobs`` on a streamed chat) are a 400 naming the field instead of being
ignored.

Loglikelihood scoring (completions; what evaluation harnesses such as lm-eval
send): ``echo`` returns the prompt before the completion, and with ``logprobs``
the prompt tokens' log-probs first (the first token's is null, as in OpenAI's
and vLLM's responses); ``max_tokens: 0`` (only with ``echo``) returns the
prompt alone. vLLM's ``prompt_logprobs`` (0..20) adds a choice's
``prompt_logprobs`` list: null, then ``{token id: {"logprob", "decoded_token"}}``
per prompt token, the token itself first; on chat completions it is the
response's top-level ``prompt_logprobs`` (as vLLM's; not with ``stream``).
Streamed, each choice's first chunk carries the echoed prompt (text and
log-probs) before its first generated text, as vLLM streams it, and its
``prompt_logprobs`` (vLLM refuses ``prompt_logprobs`` > 0 with ``stream``; Sluice
sends them). ``text_offset`` counts characters of the text the choice returned:
a token the echoed string does not contain (the BOS a tokenizer adds to a string
prompt) has no width, and a stream's offsets continue across its chunks.

Structured outputs (both endpoints; `sluice.runtime.structured_output`):
``response_format`` ``{"type": "json_object"}`` or ``{"type": "json_schema",
"json_schema": {"name", "schema", "strict"}}`` (``"text"``: none), vLLM's
``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``, or
its newer ``structured_outputs`` object (``json``, ``regex``, ``choice``,
``grammar``, ``json_object``; its backend options ``backend``,
``disable_fallback``, ``disable_any_whitespace``, ``disable_additional_properties``
and ``whitespace_pattern`` are accepted and ignored, any other field is a 400);
at most one of these per request. An invalid
schema, a schema keyword the grammar engine does not implement, a regex that
does not compile, a grammar with a syntax error, or two constraints at once are
a 400 naming the field the client sent.

Tool calling (chat; `sluice.runtime.tool_calls`): ``tools`` (functions),
``tool_choice`` (``"none"``, ``"auto"``, ``"required"`` or ``{"type":
"function", "function": {"name"}}``; a name that is not a tool is a 400) and
``parallel_tool_calls``. Tools reach the chat template as its ``tools``
variable (``"none"``: not at all), assistant messages may carry
``tool_calls`` (their JSON arguments handed to the template as objects) and
``role: "tool"`` messages their ``tool_call_id``. ``"required"`` and a named
function constrain decoding to valid calls (a constraint besides them is a
400 ``tool_choice``).
Beyond OpenAI's fields, requests take vLLM's extras ``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos``, ``priority``, ``stop_token_ids``,
``skip_special_tokens`` and ``include_stop_str_in_output``, and Sluice's
``conversation_id`` (multi-turn KV reuse: a turn whose prompt extends the
previous turn's, under the same id and client (``user``, else the API key),
copies that turn's KV back from host memory instead of recomputing it; needs
``--swap-space``).

Numeric fields have documented ranges, checked at intake (a 400 naming the
field, never a 500, whatever the JSON holds: ``1e309``, ``NaN``, ``2**64``): the
sampling fields those of `sluice.runtime.sampling_params` (``max_completion_tokens``
as ``max_tokens``); ``n`` and ``best_of`` 1..128; ``priority`` an int64;
``logprobs`` / ``top_logprobs`` 0..20; token ids (prompts, ``stop_token_ids``,
``/detokenize``, embedding inputs) in the vocabulary; ``logit_bias`` is refused
whatever it holds (unless empty).

`APIError` (defined in `sluice.runtime.http_errors`, re-exported here) is the one
exception the server turns into an HTTP error: it carries
the status and the OpenAI error object ``{"error": {"message", "type", "param",
"code"}}``. `parse` maps a pydantic failure to a 400 whose ``param`` is the
failing field's path (``messages[0].content``); `sampling_params` maps a
`SamplingParams` ``ValueError`` (whose message starts with the field name) the
same way.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from sluice.runtime.http_errors import APIError
from sluice.runtime.request import TokenLogprobs
from sluice.runtime.sampling_params import (INT64_MAX, INT64_MIN, MAX_LOGPROBS, MAX_N,
                                             SamplingParams)
from sluice.runtime.structured_output import StructuredOutputs
from sluice.runtime.tokenizer import Tokenizer
from sluice.runtime.tool_calls import ToolCalling, detect_format


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """Fields that completions and chat completions share."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX)
    conversation_id: str | None = Field(None, min_length=1, max_length=200)
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None

    def constraint(self) -> tuple[StructuredOutputs | None, str | None]:
        """The request's structured-output constraint and the field that gave it
        (module docstring); a 400 naming the field for a bad one or for two."""
        given = [f for f in _CONSTRAINT_FIELDS if getattr(self, f) is not None]
        if self.response_format is not None and self.response_format.get("type") == "text":
            given.remove("response_format")
        if len(given) > 1:
            raise APIError(400, f"{given[1]}: only one of {', '.join(given)} may be given "
                           "(each constrains the output)", param=given[1])
        if not given:
            return None, None
        field = given[0]
        value = getattr(self, field)
        if field == "response_format":
            fields, param = _response_format(value)
        elif field == "structured_outputs":
            fields, param = value, field
        else:
            fields, param = {_GUIDED[field]: value}, field
        try:
            return StructuredOutputs.from_dict(fields), field
        except ValueError as e:
            msg = str(e).split(": ", 1)[-1]
            raise APIError(400, f"{param}: {msg}", param=param) from None

    def _unsupported(self) -> None:
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true",
                           param="stream_options")

    def _sampling_kwargs(self) -> dict[str, Any]:
        names = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "seed", "stop", "stop_token_ids",
                 "ignore_eos", "skip_special_tokens", "include_stop_str_in_output")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


_CONSTRAINT_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice",
                      "guided_grammar", "structured_outputs")
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}



def _response_format(value: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """``response_format`` as `StructuredOutputs` fields, and the path to name in errors."""
    kind = value.get("type")
    if kind == "json_object":
        return {"json_object": True}, "response_format"
    if kind != "json_schema":
        raise APIError(400, "response_format.type: must be 'text', 'json_object' or "
                       f"'json_schema', got {kind!r}", param="response_format.type")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise APIError(400, "response_format.json_schema: must be an object with 'name' and "
                       "'schema'", param="response_format.json_schema")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise APIError(400, "response_format.json_schema.name: must be a non-empty string",
                       param="response_format.json_schema.name")
    if "strict" in spec and not isinstance(spec["strict"], (bool, type(None))):
        raise APIError(400, "response_format.json_schema.strict: must be a bool",
                       param="response_format.json_schema.strict")
    schema = spec.get("schema", {"type": "object"})
    return {"json": schema}, "response_format.json_schema.schema"


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    def prompts(self) -> list[str | dict[str, list[int]]]:
        """The prompt field as engine prompts (a list of strings or token lists)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [{"prompt_token_ids": p}]
        return [x if isinstance(x, str) else {"prompt_token_ids": x} for x in p]

    def sampling_params(self, max_model_len: int) -> SamplingParams:
        self._unsupported()
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens: must be at least 1 (0 only with echo)",
                           param="max_tokens")
        if self.suffix is not None:
            raise APIError(400, "suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of: only best_of == n is supported", param="best_of")
        constraint, _ = self.constraint()
        # echoed log-probs are prompt log-probs; with max_tokens 0 one token is
        # generated and left out of the response
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None)
                  if k is not None]
        return _make_params({**self._sampling_kwargs(), "structured_outputs": constraint,
                             "prompt_logprobs": max(wanted) if wanted else None},
                            1 if self.max_tokens == 0 else self.max_tokens, max_model_len,
                            self.logprobs)


class TextPart(_Request):
    type: str
    text: str | None = None


class FunctionCall(_Request):
    name: str
    arguments: str


class MessageToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # a tool result: the call it answers

    def for_template(self, i: int) -> dict[str, Any]:
        """The message as HF chat templates read it: tool-call arguments as objects."""
        out: dict[str, Any] = {"role": self.role, "content": self.text(i)}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            calls = []
            for j, call in enumerate(self.tool_calls):
                try:
                    args = json.loads(call.function.arguments)
                except json.JSONDecodeError:
                    raise APIError(400, "arguments: must be JSON text",
                                   param=f"messages[{i}].tool_calls[{j}].function.arguments"
                                   ) from None
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": args}})
            out["tool_calls"] = calls
        return out

    def text(self, i: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise APIError(400, f"content part type {part.type!r} is not supported "
                               "(only text)", param=f"messages[{i}].content[{j}]")
            parts.append(part.text)
        return "".join(parts)


class ChatPrompt(_Request):
    messages: list[ChatMessage]
    add_generation_prompt: bool = True

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools the chat template is given (None: none)."""
        return None

    def render(self, tokenizer: Tokenizer) -> list[int]:
        """The conversation through the chat template, as token ids."""
        if not self.messages:
            raise APIError(400, "messages: must contain at least one message", param="messages")
        msgs = [m.for_template(i) for i, m in enumerate(self.messages)]
        try:
            text = tokenizer.apply_chat_template(msgs, self.add_generation_prompt,
                                                 tools=self.template_tools())
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        return tokenizer.encode(text, add_special_tokens=False)


class FunctionDefinition(_Request):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling, ChatPrompt):
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def tool_calling(self, chat_template: str | None = None) -> ToolCalling | None:
        """The request's tool calling (None: no tools, or ``tool_choice`` "none");
        ``chat_template`` picks the format calls are parsed in."""
        if self.tool_choice is not None and not self.tools:
            raise APIError(400, "tool_choice: only allowed when tools are given",
                           param="tool_choice")
        if not self.tools or self.tool_choice == "none":
            return None
        choice = self.tool_choice or "auto"
        tools = [t.model_dump(exclude_none=True) for t in self.tools]
        names = [t.function.name for t in self.tools]
        if len(set(names)) != len(names):
            raise APIError(400, "tools: function names must be unique", param="tools")
        if isinstance(choice, NamedToolChoice):
            choice = choice.function.name
            if choice not in names:
                raise APIError(400, f"tool_choice: function {choice!r} is not one of the tools "
                               f"({', '.join(names)})", param="tool_choice")
        calling = ToolCalling(tools, choice, self.parallel_tool_calls,
                              detect_format(chat_template))
        for i, t in enumerate(self.tools):  # a schema that cannot constrain is the client's
            if choice in ("required", t.function.name):
                try:
                    StructuredOutputs(json=calling.parameters(t.function.name))
                except ValueError as e:
                    raise APIError(400, f"tools[{i}].function.parameters: "
                                   f"{str(e).split(': ', 1)[-1]}",
                                   param=f"tools[{i}].function.parameters") from None
        return calling

    def template_tools(self) -> list[dict[str, Any]] | None:
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def sampling_params(self, max_model_len: int) -> SamplingParams:
        self._unsupported()
        constraint, field = self.constraint()
        calling = self.tool_calling()
        tool_constraint = None if calling is None else _tool_constraint(calling)
        if tool_constraint is not None:
            if constraint is not None:
                raise APIError(400, f"tool_choice: {calling.choice!r} constrains the output, "
                               f"so {field} cannot be given too", param="tool_choice")
            constraint = tool_constraint
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true",
                           param="top_logprobs")
        if self.prompt_logprobs is not None and self.stream:  # vLLM refuses it too
            raise APIError(400, "prompt_logprobs: not supported with stream on chat "
                           "completions", param="prompt_logprobs")
        newer = self.max_completion_tokens is not None
        max_tokens = self.max_completion_tokens if newer else self.max_tokens
        try:
            return _make_params({**self._sampling_kwargs(), "structured_outputs": constraint,
                                 "prompt_logprobs": self.prompt_logprobs},
                                max_tokens, max_model_len,
                                (self.top_logprobs or 0) if self.logprobs else None)
        except APIError as e:
            if newer and e.param == "max_tokens":  # name the field the client sent
                e.message = e.message.replace("max_tokens", "max_completion_tokens", 1)
                e.param = "max_completion_tokens"
            raise


def _tool_constraint(calling: ToolCalling) -> StructuredOutputs | None:
    """The decoding constraint of ``tool_choice`` over ``tools`` (each tool's schema was
    checked alone; combined they can still fail), a 400 naming both if it cannot be built."""
    try:
        return calling.constraint
    except ValueError as e:
        raise APIError(400, f"tools: with tool_choice {calling.choice!r} the tools' parameter "
                       f"schemas cannot constrain decoding ({str(e).split(': ', 1)[-1]})",
                       param="tools") from None


class EmbeddingRequest(_Request):
    input: Prompt
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class PriorityRequest(_Request):
    """``POST /admin/priority``: re-rank a running completion by its response ``id``."""

    request_id: str
    priority: int = Field(ge=INT64_MIN, le=INT64_MAX)


R = TypeVar("R", bound=BaseModel)


def parse(cls: type[R], body: bytes) -> R:
    """Validate a JSON body; a malformed or invalid one is a 400 naming the field."""
    try:
        return cls.model_validate_json(body)
    except pydantic.ValidationError as e:
        errors = e.errors(include_url=False)
        err = errors[0]
        if err["type"] == "json_invalid":
            raise APIError(400, f"invalid JSON body: {err['msg']}") from None
        param, is_union = _loc(err["loc"])
        if not param:
            raise APIError(400, f"body: {err['msg']}") from None
        msg = "does not match any of the allowed types" if is_union else err["msg"]
        raise APIError(400, f"{param}: {msg}", param=param) from None


_UNION_TAGS = {"str", "int", "float", "bool"}


def _loc(loc: tuple) -> tuple[str, bool]:
    """A pydantic error location as ``messages[0].content``, and whether it stopped
    at a union branch tag (pydantic names union branches, e.g. ``list[int]``)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_TAGS or "[" in part:
            return out, True
        else:
            out += f".{part}" if out else part
    return out, False


def _make_params(kwargs: dict[str, Any], max_tokens: int | None, max_model_len: int,
                 logprobs: int | None) -> SamplingParams:
    try:
        return SamplingParams(max_tokens=max_model_len if max_tokens is None else max_tokens,
                              logprobs=logprobs, **kwargs)
    except ValueError as e:
        raise value_error(e) from None


def value_error(e: ValueError) -> APIError:
    """An engine/SamplingParams ValueError ("field: message") as a 400 naming the field."""
    msg = str(e)
    field = msg.split(":", 1)[0] if ":" in msg else None
    return APIError(400, msg, param=field if field and " " not in field else None)


# -- responses -----------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tokenizer: Tokenizer, lps: list[TokenLogprobs],
                        text_offset: int) -> dict[str, list]:
    """The legacy completions ``logprobs`` object for some generated tokens, the
    first at ``text_offset`` in the choice's text."""
    return _logprobs_object(tokenizer, [lp.token_id for lp in lps], lps, None, text_offset)


def echo_logprobs(tokenizer: Tokenizer, prompt_ids: list[int],
                  prompt_lps: list[TokenLogprobs | None] | None, k: int,
                  prompt: str | None) -> dict[str, list]:
    """The completions ``logprobs`` object of an echoed prompt: its first token's
    log-prob null, ``k`` alternatives per prompt token, and offsets into the echoed
    text: ``prompt`` as sent (tokens the tokenizer added to it, such as BOS, take no
    width), or None for a token prompt, echoed as decoded. Without ``prompt_lps`` (a
    request that failed before its prompt was scored) the log-probs are null."""
    lps = [None] + list(prompt_lps or [None] * len(prompt_ids))[1:]
    widths = None if prompt is None else _echo_widths(tokenizer, prompt, prompt_ids)
    return _logprobs_object(tokenizer, prompt_ids, lps, k, 0, widths)


def join_logprobs(first: dict[str, list], then: dict[str, list]) -> dict[str, list]:
    """Two consecutive pieces of one choice's ``logprobs`` object as one."""
    return {key: first[key] + then[key] for key in first}


def _logprobs_object(tokenizer: Tokenizer, ids: list[int], lps: list[TokenLogprobs | None],
                     k: int | None, start: int, widths: list[int] | None = None
                     ) -> dict[str, list]:
    """``tokens``/``token_logprobs``/``top_logprobs``/``text_offset`` for ``ids`` from
    ``start``, each token ``widths[i]`` characters wide (default: its text's length);
    ``k`` caps the alternatives (None: all that were computed)."""
    tokens = [token_text(tokenizer, t) for t in ids]
    offsets, at = [], start
    for width in widths if widths is not None else map(len, tokens):
        offsets.append(at)
        at += width
    return {"tokens": tokens,
            "token_logprobs": [None if lp is None else lp.logprob for lp in lps],
            "top_logprobs": [None if lp is None else
                             {token_text(tokenizer, t): v for t, v in list(lp.top.items())[:k]}
                             for lp in lps],
            "text_offset": offsets}


def _echo_widths(tokenizer: Tokenizer, prompt: str, ids: list[int]) -> list[int]:
    """Each prompt token's width in the prompt string it was encoded from: the tokens
    encoding added around the text (BOS, EOS: those not in ``encode(prompt,
    add_special_tokens=False)``) are not in the string, so they take none."""
    widths = [len(token_text(tokenizer, t)) for t in ids]
    plain = tokenizer.encode(prompt, add_special_tokens=False)
    for lead in range(len(ids) - len(plain) + 1):
        if ids[lead:lead + len(plain)] == plain:
            for i in [*range(lead), *range(lead + len(plain), len(ids))]:
                widths[i] = 0
            break
    return widths


def prompt_logprobs(tokenizer: Tokenizer, lps: list[TokenLogprobs | None],
                    k: int) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs``: null, then per prompt token its own and its ``k``
    alternatives' ``{"logprob", "decoded_token"}`` by token id."""
    def entries(lp: TokenLogprobs) -> dict[str, dict[str, Any]]:
        both = {lp.token_id: lp.logprob, **dict(list(lp.top.items())[:k])}
        return {str(t): {"logprob": v, "decoded_token": token_text(tokenizer, t)}
                for t, v in both.items()}
    return [None if lp is None else entries(lp) for lp in lps]


def chat_logprobs(tokenizer: Tokenizer, lps: list[TokenLogprobs]) -> dict[str, Any]:
    """The chat ``logprobs`` object (``content`` entries with ``top_logprobs``)."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
    return {"content": [{**entry(lp.token_id, lp.logprob),
                         "top_logprobs": [entry(t, v) for t, v in lp.top.items()]}
                        for lp in lps],
            "refusal": None}


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
