"""OpenAI API request schemas, their mapping to `SamplingParams`, and the
response and error objects the server sends.

Requests are pydantic models validated in strict JSON mode, so ``"max_tokens":
"5"`` or ``"stream": 1`` is a 400 rather than a silent coercion (as OpenAI
does). Unknown fields are ignored (as vLLM does, so clients that send newer
OpenAI fields keep working); known fields that Sluice cannot honour (tools,
``response_format``, ``logit_bias``, ``echo``, ``suffix``, ``best_of`` != n,
non-text content parts) are a 400 naming the field instead of being ignored.
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

`APIError` is the one exception the server turns into an HTTP error: it carries
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

from sluice.runtime.request import TokenLogprobs
from sluice.runtime.sampling_params import (INT64_MAX, INT64_MIN, MAX_LOGPROBS, MAX_N,
                                             SamplingParams)
from sluice.runtime.tokenizer import Tokenizer


class APIError(Exception):
    """An HTTP error with an OpenAI-style error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


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


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
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
        if self.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if self.suffix is not None:
            raise APIError(400, "suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of: only best_of == n is supported", param="best_of")
        return _make_params(self._sampling_kwargs(), self.max_tokens, max_model_len,
                            self.logprobs)


class TextPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

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

    def render(self, tokenizer: Tokenizer) -> list[int]:
        """The conversation through the chat template, as token ids."""
        if not self.messages:
            raise APIError(400, "messages: must contain at least one message", param="messages")
        msgs = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]
        try:
            text = tokenizer.apply_chat_template(msgs, self.add_generation_prompt)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        return tokenizer.encode(text, add_special_tokens=False)


class ChatCompletionRequest(_Sampling, ChatPrompt):
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def sampling_params(self, max_model_len: int) -> SamplingParams:
        self._unsupported()
        for name in ("tools", "response_format"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported", param=name)
        if self.tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice is not supported", param="tool_choice")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true",
                           param="top_logprobs")
        newer = self.max_completion_tokens is not None
        max_tokens = self.max_completion_tokens if newer else self.max_tokens
        try:
            return _make_params(self._sampling_kwargs(), max_tokens, max_model_len,
                                (self.top_logprobs or 0) if self.logprobs else None)
        except APIError as e:
            if newer and e.param == "max_tokens":  # name the field the client sent
                e.message = e.message.replace("max_tokens", "max_completion_tokens", 1)
                e.param = "max_completion_tokens"
            raise


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
    """The legacy completions ``logprobs`` object for some generated tokens."""
    tokens, offsets = [], []
    for lp in lps:
        tokens.append(token_text(tokenizer, lp.token_id))
        offsets.append(text_offset)
        text_offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{token_text(tokenizer, t): v for t, v in lp.top.items()}
                             for lp in lps],
            "text_offset": offsets}


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
