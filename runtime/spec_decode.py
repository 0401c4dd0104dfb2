"""n-gram (prompt-lookup) speculative decoding: the draft proposer, which
requests take drafts, and the acceptance counters
(``EngineConfig.num_speculative_tokens``, default 0: off).

A draft is guessed from the request's own tokens: the longest suffix of 3, 2 or
1 tokens that occurred earlier in the prompt or output, and the tokens that
followed its latest earlier occurrence. Answers that quote their prompt (the RAG
generative path) repeat it; random text rarely does, and then costs one row of
padding-free extra work per drafted token.

The scheduler (`sluice.scheduler.local`) gives a decode-ready request its draft
as extra tokens of its row (within the step's token budget and KV reservation);
the runner samples the target's token at every one of the row's positions, each
with the request's own settings (temperature, top-k/top-p/min-p, penalties over
the output up to that position) and its own random numbers (the step index plain
decoding has there); the scheduler keeps the draft tokens up to the first one the
target did not sample, plus the target's token at that position (or after the
whole draft). KV written for rejected positions lies past ``num_computed_tokens``
and is overwritten later; blocks reserved only for them return to the pool as
soon as the step's output is applied.

Acceptance is the standard rejection rule of speculative sampling for a draft
that is a point mass q = delta(x) (n-gram drafts are deterministic): accept x with
probability min(1, p(x) / q(x)) = p(x), where p is the target's distribution after
the request's sampling settings; on rejection take a token from p with x removed,
renormalized; after a fully accepted draft, one more from p. Drawing y ~ p with
the random numbers plain decoding would use and accepting iff y == x is that rule
(P(y == x) = p(x), and y given y != x is p without x, renormalized), so outputs
are distributed as plain sampling's, and a seeded request's tokens are the ones it
gets without drafts (as far as the drafted step's logits round like the plain
step's, which greedy ties need too). Greedy rows are its temperature-0 case (p is
a point mass on the argmax): token-identical to plain decoding. A draft token is
kept with probability p(x), so drafts pay off for greedy and low-temperature
requests, much less at high temperatures.

Drafting pays only where drafts are accepted: a drafted row runs in the prompt
group, so an all-decode step that takes one becomes a mixed step, costlier by
far on CPU. The scheduler keeps a `DraftOutlook` per request, a running estimate
of the draft tokens its drafts get accepted, and the request drafts only while
that is at least `MIN_EXPECTED_ACCEPTED`. The estimate keeps learning while the
request does not draft: its proposal is still made (on the host, no step work)
and compared with the tokens the request goes on to generate, so a request that
starts quoting later drafts again. And a step of decodes only takes drafts only
if their expected accepted tokens pay for making it a mixed step (`drafts_pay`).
Free-form chat at 8 requests was 0.74x of plain decoding without either, 0.99x
with both (15% of draft tokens accepted; `bench/spec_decode.py`).

What drafts (`may_draft`): greedy and sampled requests, with penalties, with
logprobs (each accepted token carries the log-probs of its own position, as plain
decoding's) and with prompt_logprobs (a decode-ready request's prompt log-probs
are complete; a step that scores a prompt chunk takes no drafts, its program
samples one row per chunk). Not drafted: structured outputs, whose grammar would
have to advance through the draft to mask each position (the step computes one
mask per request); they decode as usual alongside drafted rows.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from sluice.runtime.request import Request

MAX_NGRAM = 3  # longest suffix looked up
MAX_SPECULATIVE_TOKENS = 16  # EngineConfig.num_speculative_tokens' upper bound
# A request drafts while its drafts are expected to get at least this many tokens
# accepted: free-form chat (0.57 per draft) lost 26% at 8 requests, quoting
# answers (2.4-2.7 per draft) gained 1.2-2x (bench/spec_decode.py, k = 4).
MIN_EXPECTED_ACCEPTED = 1.0
OUTLOOK_WEIGHT = 0.3  # the newest observation's weight in the running estimate
# A decode-only step that takes drafts runs as a mixed step (its decode group
# padded to the mixed shapes' bucket, the drafted rows in the prompt group); its
# cost relative to the plain step. Assumed, not measured per shape: the value
# that stops free-form chat at 8 requests drafting and keeps quoting answers
# drafting (bench/spec_decode.py; bench/RESULTS.md has the runs).
MIXED_STEP_COST = 2.0


@dataclasses.dataclass
class DraftOutlook:
    """A request's expected accepted draft tokens per draft (``expected``, an
    exponentially weighted mean, starting at the first draft's length: optimistic), from
    its verified drafts and from the proposals it did not draft (``shadow``: the
    output length when proposed and the proposal, checked against the tokens
    generated after)."""

    expected: float
    shadow: tuple[int, list[int]] | None = None

    @classmethod
    def first(cls, draft_length: int) -> DraftOutlook:
        """A request's outlook before its first draft (of ``draft_length`` tokens)."""
        return cls(max(float(draft_length), MIN_EXPECTED_ACCEPTED))

    def observe(self, accepted: int) -> None:
        """One draft (or shadow proposal) of which ``accepted`` tokens were kept."""
        self.expected += OUTLOOK_WEIGHT * (accepted - self.expected)

    def hold(self, output_len: int, draft: list[int]) -> None:
        """A draft proposed but not taken (`drafts_pay` said no): it becomes the
        shadow, checked against the tokens generated after ``output_len``."""
        if self.shadow is None:
            self.shadow = (output_len, draft)

    def worth_drafting(self) -> bool:
        return self.expected >= MIN_EXPECTED_ACCEPTED

    def settle_shadow(self, output_token_ids: Sequence[int]) -> None:
        """Observe the pending shadow proposal once the tokens generated since it
        tell how much of it would have been accepted (a mismatch, or all of it)."""
        if self.shadow is None:
            return
        start, proposal = self.shadow
        made = output_token_ids[start:start + len(proposal)]
        kept = next((j for j, (a, b) in enumerate(zip(made, proposal)) if a != b), len(made))
        if kept < len(made) or kept == len(proposal):
            self.observe(kept)
            self.shadow = None


def propose(token_ids: Sequence[int], k: int) -> list[int]:
    """Up to ``k`` tokens following the latest earlier occurrence of the longest
    suffix (``MAX_NGRAM`` down to 1 tokens) of ``token_ids`` that occurred
    before; ``[]`` if none did or ``k`` is 0."""
    if k <= 0 or len(token_ids) < 2:
        return []
    tokens = np.asarray(token_ids, np.int64)
    size = len(tokens)
    for n in range(min(MAX_NGRAM, size - 1), 0, -1):
        # windows starting at 0 .. size - n - 1 (the suffix itself excluded)
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:size - 1], n)
        hits = np.flatnonzero((windows == tokens[size - n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start:start + k].tolist()
    return []


def may_draft(req: Request) -> bool:
    """Whether the request's next tokens may be drafted (module docstring)."""
    return req.params.structured_outputs is None and req.grammar is None


def drafts_pay(drafts: Sequence[tuple[list[int], DraftOutlook]], decode_rows: int) -> bool:
    """Whether ``drafts`` (each with its request's outlook) should turn a step of
    ``decode_rows`` decodes into a mixed step: the tokens they are expected to get
    accepted must make up for its cost, `MIXED_STEP_COST` times the plain step's,
    i.e. come to ``decode_rows * (MIXED_STEP_COST - 1)`` at least."""
    expected = sum(min(o.expected, len(d)) for d, o in drafts)
    return bool(drafts) and expected >= decode_rows * (MIXED_STEP_COST - 1)


def draft_for(req: Request, room: int, outlook: DraftOutlook) -> list[int]:
    """The draft of up to ``room`` tokens ``req`` takes this step: its proposal if
    its ``outlook`` says drafting pays, else ``[]`` (the proposal then becomes the
    outlook's shadow, if none is pending)."""
    outlook.settle_shadow(req.output_token_ids)
    if outlook.worth_drafting():
        return propose(req.all_token_ids, room)
    if outlook.shadow is None and (proposal := propose(req.all_token_ids, room)):
        outlook.shadow = (len(req.output_token_ids), proposal)
    return []


@dataclasses.dataclass
class SpecDecodeStats:
    """Drafts verified so far (vLLM's ``spec_decode`` counters): drafts, their
    tokens, the tokens accepted, and accepted tokens by draft position."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = dataclasses.field(default_factory=list)

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        """One draft of ``num_draft_tokens`` tokens whose first ``num_accepted`` were accepted."""
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        missing = num_accepted - len(self.accepted_per_position)
        self.accepted_per_position.extend([0] * max(0, missing))
        for j in range(num_accepted):
            self.accepted_per_position[j] += 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted over drafted tokens (0 before any draft)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


def check_num_speculative_tokens(k: object) -> None:
    """ValueError naming the field unless ``k`` is an int in [0, MAX_SPECULATIVE_TOKENS]."""
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(f"num_speculative_tokens: must be an int in "
                         f"[0, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
