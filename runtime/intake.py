"""Request intake: validate and tokenize a prompt into a `Group` of `Request`s.

The engine uses it for ``prepare``; the multi-instance front end uses its own
(`sluice.scheduler.cluster`), so requests are built once, before dispatch, with
their sampling seeds fixed: a request re-dispatched after its instance died, or
migrated, samples exactly what it would have sampled where it started.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from sluice.runtime.detokenizer import IncrementalDetokenizer
from sluice.runtime.loader import Model
from sluice.runtime.request import Request, TokenLogprobs
from sluice.runtime.sampling_params import INT64_MAX, INT64_MIN, SamplingParams
from sluice.runtime.structured_output import compile_constraint

Prompt = str | dict[str, Any]


@dataclasses.dataclass
class Group:
    """One user request: ``n`` sibling `Request`s sharing a prompt."""

    request_id: str
    prompt: str | None
    requests: list[Request]
    # The engine's outputs for this group are deltas (`sluice.runtime.outputs`);
    # ``sent`` counts each completion's tokens already in an output.
    delta_outputs: bool = False
    sent: list[int] = dataclasses.field(default_factory=list)
    prompt_logprobs_sent: bool = False  # a delta output has carried them (once per group)

    @property
    def finished(self) -> bool:
        return all(r.is_finished for r in self.requests)

    def output_prompt_logprobs(self) -> list[TokenLogprobs | None] | None:
        """The prompt log-probs the group's next output carries: None until the
        first completion (which scores the prompt for its siblings) has them all;
        then a copy in every cumulative output, and in the first delta output only
        (a fact of the group: a sibling's progress, or the first completion ending
        before the others, does not send them again)."""
        first = self.requests[0]
        if first.params.prompt_logprobs is None or first.needs_prompt_logprobs:
            return None
        if self.delta_outputs:
            if self.prompt_logprobs_sent:
                return None
            self.prompt_logprobs_sent = True
        return list(first.prompt_logprobs)


def check_priority(priority: Any) -> int:
    """A request priority: an int64 (lower runs first under the priority policy;
    the policies do float arithmetic on it, which a larger int would overflow)."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority: must be an integer, got {priority!r}")
    if not INT64_MIN <= priority <= INT64_MAX:
        raise ValueError(f"priority: must be in [{INT64_MIN}, {INT64_MAX}], got an integer "
                         f"of {priority.bit_length()} bits")
    return priority


class Intake:
    def __init__(self, model: Model, max_model_len: int, seed: int | None = None):
        self.model = model
        self.max_model_len = max_model_len
        self._rng = np.random.default_rng(seed)

    def prepare(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None,
                priority: int = 0, client: str | None = None,
                seeds: Sequence[int] | None = None, conversation: str | None = None) -> Group:
        """Validate and tokenize (raising ``ValueError`` naming the field). ``seeds``
        (one per completion) rebuilds a request exactly; by default seeded params
        give ``seed + i`` and unseeded ones draw from this intake's generator.
        ``conversation`` keys multi-turn KV reuse (the next turn's prompt extends
        this one's); it needs a single completion (n = 1)."""
        params = params or SamplingParams()
        check_priority(priority)
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling_params: must be a SamplingParams")
        if conversation is not None and (not isinstance(conversation, str) or not conversation
                                         or len(conversation) > 1024):
            raise ValueError("conversation: must be a non-empty string of at most 1024 characters")
        if conversation is not None and params.n != 1:
            raise ValueError(f"conversation: needs n = 1 (one completion to continue), "
                             f"got n = {params.n}")
        text, ids = self._tokenize(prompt)
        self._check_length(len(ids), params.max_tokens)
        if params.structured_outputs is not None:
            # compiled here, on the caller's thread, not by the engine's step (which
            # every running request waits for); a grammar llguidance cannot build or
            # that fails its probe is a ValueError naming the field
            compile_constraint(self.model.tokenizer, self.model.config.vocab_size,
                               self.model.eos_token_ids, params.structured_outputs)
        max_tokens = min(params.max_tokens, max(1, self.max_model_len - len(ids)))
        requests = []
        for i in range(params.n):
            if seeds is not None:
                seed = seeds[i]
            elif params.seed is not None:
                seed = params.seed + i
            else:
                seed = int(self._rng.integers(2**31))
            detok = IncrementalDetokenizer(
                self.model.tokenizer, ids, stop=params.stop or [],
                include_stop_str_in_output=params.include_stop_str_in_output,
                skip_special_tokens=params.skip_special_tokens)
            rid = request_id if params.n == 1 else f"{request_id}-{i}"
            requests.append(Request(rid, request_id, i, list(ids), params, seed, detok,
                                    max_tokens, self.model.eos_token_ids, priority, client,
                                    conversation=conversation))
        return Group(request_id, text, requests)

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: must not be empty")
            text, ids = prompt, self.model.tokenizer.encode(prompt)
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, ids = None, prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError("prompt_token_ids: must be a list of integers")
            ids = list(ids)
            bad = [t for t in ids if not 0 <= t < self.model.config.vocab_size]
            if bad:
                raise ValueError(f"prompt_token_ids: token id {bad[0]} is outside the vocabulary "
                                 f"[0, {self.model.config.vocab_size})")
        else:
            raise ValueError("prompt: must be a string or {'prompt_token_ids': [...]}")
        if not ids:
            raise ValueError("prompt: must not be empty")
        return text, ids

    def _check_length(self, num_prompt: int, max_tokens: int) -> None:
        """A prompt must leave room for what it generates. The last generated token
        needs no KV (it is sampled from the position before it and ends the
        request), so a prompt of exactly ``max_model_len`` tokens takes one token:
        what scoring a full-context prompt sends (``echo`` with ``max_tokens`` 0)."""
        limit = self.max_model_len
        if num_prompt > limit or num_prompt == limit and max_tokens > 1:
            raise ValueError(f"prompt: {num_prompt} tokens leave no room to generate within "
                             f"max_model_len={limit} (a prompt of exactly max_model_len tokens "
                             "is accepted for max_tokens 1 only)")

