"""Per-request state: what the request asked for, what it has produced, and
how far its KV is computed; nothing derivable from the KV cache manager.

A `Request` is one sequence being generated (a user request with ``n > 1``
becomes ``n`` requests with a common ``parent_id``). ``num_computed_tokens``
counts tokens whose KV is in the cache; only the per-instance scheduler
changes it (it advances it after each step, recompute preemption resets it to
0), and a request samples a token in any step that brings it up to
``num_tokens``. Where its KV lives (device blocks, host copies, swapped out)
is the scheduler's KV cache manager's (`sluice.runtime.kv_manager`).
"""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import TYPE_CHECKING

from sluice.runtime.detokenizer import IncrementalDetokenizer
from sluice.runtime.sampling_params import SamplingParams
from sluice.runtime.structured_output import GRAMMAR_ERROR, GrammarState

if TYPE_CHECKING:
    from sluice.runtime.outputs import RequestMetrics


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass
class TokenLogprobs:
    """Log-probability of a chosen token and the top alternatives at that step."""

    token_id: int
    logprob: float
    top: dict[int, float]


@dataclasses.dataclass
class Request:
    request_id: str
    parent_id: str
    index: int  # completion index within the parent (0..n-1)
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    detokenizer: IncrementalDetokenizer
    max_tokens: int  # params.max_tokens capped by the context left after the prompt
    eos_token_ids: tuple[int, ...] = ()
    priority: int = 0
    client: str | None = None
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    emitted_text: str = ""  # text already handed to the caller (streaming)
    logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    finished_time: float | None = None
    num_preemptions: int = 0
    num_displacements: int = 0  # preemptions by higher-priority work (bounded)
    conversation: str | None = None  # multi-turn KV reuse key (sluice.runtime.swap)
    waiting_since: float | None = None  # when it last entered the waiting queue (scheduler)
    running_since: float | None = None  # when it was last admitted to run (scheduler)
    num_cached_tokens: int = 0
    # its structured-output matcher (sluice.runtime.structured_output); rebuilt from
    # output_token_ids wherever the request runs
    grammar: GrammarState | None = None
    # log-probs of prompt tokens 0.. so far (params.prompt_logprobs); token 0 has none
    prompt_logprobs: list[TokenLogprobs | None] = dataclasses.field(
        default_factory=lambda: [None])

    def __post_init__(self) -> None:
        if self.grammar is None and self.params.structured_outputs is not None:
            self.grammar = GrammarState(self.params.structured_outputs)
        # Prompt + output, kept up to date by `append_token` rather than rebuilt
        # by the runner and block manager on every step.
        self.all_token_ids: list[int] = self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    def is_decode(self, num_new_tokens: int) -> bool:
        """One new token that completes the sequence: a decode, not a prompt chunk."""
        return num_new_tokens == 1 and self.num_computed_tokens + 1 == self.num_tokens

    def samples(self, num_new_tokens: int) -> bool:
        """Whether a step computing ``num_new_tokens`` more tokens (from
        ``num_computed_tokens``) samples this request's next token: it brings the
        request up to ``num_tokens`` (a prefill chunk short of that samples nothing)."""
        return self.num_computed_tokens + num_new_tokens >= self.num_tokens

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether this request still has prompt log-probs to compute (only the first
        completion of a group computes them; its siblings share them). Such a
        request takes no prefix-cache hit: a cached token has no logits."""
        return (self.params.prompt_logprobs is not None and self.index == 0
                and len(self.prompt_logprobs) < len(self.prompt_token_ids))

    def add_prompt_logprobs(self, start: int, lps: list[TokenLogprobs]) -> None:
        """Record the log-probs of prompt tokens ``start, start + 1, ...``; positions
        already recorded (a chunk recomputed after preemption) are kept, not doubled."""
        skip = len(self.prompt_logprobs) - start
        if skip >= 0:
            self.prompt_logprobs.extend(lps[skip:])

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int, now: float) -> None:
        """Record a sampled token and decide whether the request is done. A token
        its grammar did not allow (it allowed none) ends it instead, unrecorded."""
        refusal = self.grammar.refusal(token_id, len(self.output_token_ids)) \
            if self.grammar is not None else None
        if refusal is not None:
            self._finish(GRAMMAR_ERROR, refusal, now)
            return
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.append(now)
        p = self.params
        if self.detokenizer.add_token(token_id):
            self._finish("stop", self.detokenizer.stop_reason, now)
        elif token_id in self.eos_token_ids and (not p.ignore_eos or self.grammar is not None):
            self._finish("stop", None, now)  # a grammar that took EOS allows nothing after it
        elif p.stop_token_ids and token_id in p.stop_token_ids:
            self._finish("stop", token_id, now)
        elif len(self.output_token_ids) >= self.max_tokens:
            self._finish("length", None, now)

    def replay(self, output_token_ids: list[int], emitted_text: str,
               finish_reason: str | None = None, stop_reason: int | str | None = None,
               metrics: RequestMetrics | None = None) -> None:
        """Restore the output a caller has already seen (re-dispatch after the
        instance serving it died): the tokens, the detokenizer's state, the
        streamed text, the timings in ``metrics`` (so time to first token and
        token gaps stay measured from the original arrival) and, for a
        completion that had finished, its end. The KV is recomputed wherever
        the request runs next."""
        if metrics is not None:
            self.first_scheduled_time = metrics.first_scheduled_time
            self.first_token_time = metrics.first_token_time
            self.token_times = list(metrics.token_times)
            self.num_preemptions = metrics.num_preemptions
        for token_id in output_token_ids:
            self.output_token_ids.append(token_id)
            self.all_token_ids.append(token_id)
            if self.detokenizer.stop_reason is None:
                self.detokenizer.add_token(token_id)
        self.detokenizer.take_delta(finished=finish_reason is not None)
        self.emitted_text = emitted_text
        if finish_reason is not None:
            self._finish(finish_reason, stop_reason, time.monotonic())

    def abort(self, now: float) -> None:
        self._finish("abort", None, now)

    def _finish(self, reason: str, stop_reason: int | str | None, now: float) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.finished_time = now
