"""What the engine returns, shaped like vLLM's ``RequestOutput``."""

from __future__ import annotations

import dataclasses

from sluice.runtime.request import TokenLogprobs


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str  # all text so far (streaming: what is safe to show)
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None
    delta: str = ""  # text added since the previous output for this request


@dataclasses.dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    token_times: list[float]
    finished_time: float | None
    num_preemptions: int
    num_cached_tokens: int


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: list[RequestMetrics]  # one per completion
