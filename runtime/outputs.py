"""What the engine returns, shaped like vLLM's ``RequestOutput``.

An output is *cumulative* (the default: each completion holds all its tokens,
log-probabilities and text so far, and ``metrics.token_times`` every token's
time) or a *delta* (``RequestOutput.delta``: each completion holds only what is
new since the request's previous output, ``text`` equals ``delta``, and
``metrics.token_times`` only the new tokens' times; ``prompt_token_ids`` is the
request's own list, shared and never modified). Streams use deltas, so each step
costs what it adds rather than a copy of everything so far, and a queue of unread
outputs grows with the output, not with its square.

`merge` folds the next output of a request into an earlier one (coalescing a
reader's unread outputs); `accumulate` builds the whole output from deltas;
`DeltaView` turns a request's cumulative outputs into deltas.
"""

from __future__ import annotations

import copy
import dataclasses

from sluice.runtime.request import TokenLogprobs


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str  # all text so far (streaming: what is safe to show); a delta's new text
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
    delta: bool = False  # only what is new since the previous output (module docstring)
    # Set on the final output of a request that failed on its own (the engine's step
    # raised for it alone): why. Its completions end with finish_reason "abort".
    error: str | None = None
    # with SamplingParams.prompt_logprobs: one entry per prompt token, None for the
    # first (nothing precedes it); a delta stream carries them in its first output only
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class RequestFailed(RuntimeError):
    """Raised to the reader of one request that the engine or the cluster gave up
    on (the message says why); other requests are not affected."""


def merge(into: RequestOutput, new: RequestOutput) -> RequestOutput:
    """``into`` followed by ``new`` (the same request's next output) as one output.

    A delta ``new`` is appended to ``into`` in place (``into`` must be a private
    copy: an unread queued output, or an accumulator); a cumulative ``new``
    supersedes ``into``, keeping the text deltas of both. Costs O(new)."""
    if not new.delta:
        return dataclasses.replace(new, outputs=[
            dataclasses.replace(comp, delta=old.delta + comp.delta)
            for old, comp in zip(into.outputs, new.outputs)])
    for old, comp in zip(into.outputs, new.outputs):
        old.token_ids.extend(comp.token_ids)
        if old.logprobs is not None and comp.logprobs is not None:
            old.logprobs.extend(comp.logprobs)
        old.text += comp.text
        old.delta += comp.delta
        old.finish_reason, old.stop_reason = comp.finish_reason, comp.stop_reason
    for old_m, m in zip(into.metrics, new.metrics):
        times = old_m.token_times
        times.extend(m.token_times)
        old_m.__dict__.update(m.__dict__)
        old_m.token_times = times
    into.finished = new.finished
    if into.prompt_logprobs is None:
        into.prompt_logprobs = new.prompt_logprobs
    return into


def accumulate(whole: RequestOutput | None, out: RequestOutput) -> RequestOutput:
    """The request's output so far: ``whole`` (a previous result of this, or None)
    extended by its next output ``out``, which is left unchanged. O(out)."""
    if not out.delta:
        return out
    if whole is None:
        return dataclasses.replace(copy.deepcopy(out), delta=False)
    merge(whole, out)
    for comp, new in zip(whole.outputs, out.outputs):
        comp.delta = new.delta
    return whole


class DeltaView:
    """Turns one request's cumulative outputs into delta outputs (deltas pass through)."""

    def __init__(self) -> None:
        self._sent: dict[int, int] = {}  # completion index -> tokens already passed on

    def __call__(self, out: RequestOutput) -> RequestOutput:
        if out.delta:
            return out
        comps, metrics = [], []
        for comp, m in zip(out.outputs, out.metrics):
            start = self._sent.get(comp.index, 0)
            self._sent[comp.index] = len(comp.token_ids)
            comps.append(dataclasses.replace(
                comp, text=comp.delta, token_ids=comp.token_ids[start:],
                logprobs=None if comp.logprobs is None else comp.logprobs[start:]))
            metrics.append(dataclasses.replace(m, token_times=m.token_times[start:]))
        return dataclasses.replace(out, outputs=comps, metrics=metrics, delta=True)
