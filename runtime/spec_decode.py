"""n-gram (prompt-lookup) speculative decoding: the draft proposer and which
requests take drafts (``EngineConfig.num_speculative_tokens``, default 0: off).

A draft is guessed from the request's own tokens: the longest suffix of 3, 2 or
1 tokens that occurred earlier in the prompt or output, and the tokens that
followed its latest earlier occurrence. Answers that quote their prompt (the RAG
generative path) repeat it; random text rarely does, and then costs one row of
padding-free extra work per drafted token.

The scheduler (`sluice.scheduler.local`) gives a decode-ready request its draft
as extra tokens of its row (within the step's token budget and KV reservation);
the runner returns the target's token at every one of the row's positions; the
scheduler keeps the longest run of draft tokens equal to the target's argmax
there plus the target's next token (greedy acceptance), so greedy output is
token-identical to plain decoding. KV written for rejected positions lies past
``num_computed_tokens`` and is overwritten by the next step.

Only greedy requests without logprobs, prompt_logprobs, penalties or structured
outputs take drafts (`may_draft`): sampled requests would need the rejection rule
(not implemented), and the others read or depend on per-position state the
verification step does not build. They decode as usual alongside drafted rows.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sluice.runtime.request import Request
from sluice.runtime.sampler import has_penalties

MAX_NGRAM = 3  # longest suffix looked up
MAX_SPECULATIVE_TOKENS = 16  # EngineConfig.num_speculative_tokens' upper bound


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
    p = req.params
    return (p.is_greedy and p.logprobs is None and p.prompt_logprobs is None
            and p.structured_outputs is None and req.grammar is None
            and not has_penalties(p))


def check_num_speculative_tokens(k: object) -> None:
    """ValueError naming the field unless ``k`` is an int in [0, MAX_SPECULATIVE_TOKENS]."""
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(f"num_speculative_tokens: must be an int in "
                         f"[0, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
