"""One-at-a-time greedy generation: the simplest correct decoder.

It runs a single sequence with a private KV pool (prefill in one call, then one
token per call). It is the reference the batched engine is tested against and
what ``make run`` uses for a quick demo; it is not a serving path.
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
    spec = KVCacheSpec.for_model(model.config, blocks_for(total, block_size), block_size,
                                model.dtype)
    cache = spec.allocate()
    tokens = list(prompt_ids)
    start = 0
    out: list[int] = []
    while len(out) < max_new_tokens:
        meta = single_sequence_metadata(len(tokens), start, spec.num_blocks, block_size)
        hidden, cache = forward(model.params, model.config,
                                jnp.asarray(tokens[start:], jnp.int32),
                                jnp.arange(start, len(tokens), dtype=jnp.int32), cache, meta)
        next_id = int(np.argmax(np.asarray(compute_logits(model.params, hidden[-1:]))[0]))
        out.append(next_id)
        tokens.append(next_id)
        start = len(tokens) - 1
        if stop_at_eos and next_id in model.eos_token_ids:
            break
    return out
