"""One-at-a-time greedy generation: the simplest correct decoder.

It runs a single sequence with a private KV pool (prefill in one call, then one
token per call). It is the reference the batched engine is tested against and
what ``make run`` uses for a quick demo; it is not a serving path.

Shapes are bucketed so that calls share compiled programs (the test suite makes
hundreds of calls with different lengths): the prompt is padded at the end to a
power of two (at least 64 tokens) and the pool to a power of two (at least 256
tokens), so short calls share two programs, a prefill and a decode step. Causal attention keeps the padding out of the prompt's hidden states, and
the padding's keys and values lie past the sequence length, so no read sees them
before a generated token overwrites them.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sluice.runtime.kv_cache import KVCacheSpec, blocks_for
from sluice.runtime.loader import Model, single_sequence_metadata
from sluice.runtime.model import compute_logits, forward


def greedy_generate(model: Model, prompt_ids: list[int], max_new_tokens: int,
                    stop_at_eos: bool = True, block_size: int = 16) -> list[int]:
    """Greedy continuation of ``prompt_ids`` (at most ``max_new_tokens`` tokens)."""
    if not prompt_ids:
        raise ValueError("prompt_ids: must not be empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    total = len(prompt_ids) + max_new_tokens
    if total > model.config.max_position_embeddings:
        raise ValueError(f"prompt_ids: prompt + max_new_tokens = {total} exceeds the model's "
                         f"context of {model.config.max_position_embeddings}")
    padded = _pow2(max(len(prompt_ids), _MIN_PROMPT_ROWS))
    spec = KVCacheSpec.for_model(model.config,
                                 blocks_for(_pow2(max(total, padded, _MIN_POOL_TOKENS)), block_size),
                                 block_size, model.dtype)
    cache = spec.allocate()
    tokens = list(prompt_ids)
    start = 0
    out: list[int] = []
    while len(out) < max_new_tokens:
        ids = tokens[start:] if start else tokens + [0] * (padded - len(tokens))
        meta = single_sequence_metadata(start + len(ids), start, spec.num_blocks, block_size)
        hidden, cache = forward(model.params, model.config, jnp.asarray(ids, jnp.int32),
                                jnp.arange(start, start + len(ids), dtype=jnp.int32), cache, meta)
        last = np.asarray(hidden)[len(tokens) - 1 - start][None]  # the last real token's row
        next_id = int(np.argmax(np.asarray(compute_logits(model.params, last))[0]))
        out.append(next_id)
        tokens.append(next_id)
        start = len(tokens) - 1
        if stop_at_eos and next_id in model.eos_token_ids:
            break
    return out


_MIN_PROMPT_ROWS = 64
_MIN_POOL_TOKENS = 256


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
