"""Sentence embeddings from a causal LM: the mean of the final-normed hidden
states over a sequence's tokens, L2-normalized (``/v1/embeddings`` serves this
until a dedicated embedding model lands).

``mean_pooled(model, token_ids) -> np.ndarray [hidden]`` runs
`sluice.runtime.model.forward` on a private KV pool, the way ``Model.logits``
does, so it never touches the engine's pool or its schedule. The sequence is
padded at the end to a power-of-two bucket so a server compiles one shape per
bucket, not per length; causal attention means the padding cannot change the
hidden states of the real tokens, which are the only ones averaged.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sluice.runtime.kv_cache import KVCacheSpec
from sluice.runtime.loader import Model, single_sequence_metadata
from sluice.runtime.model import forward

MIN_BUCKET = 16


def bucket(n: int) -> int:
    """The padded length for ``n`` tokens: a power of two, at least `MIN_BUCKET`."""
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def mean_pooled(model: Model, token_ids: list[int], block_size: int = 16) -> np.ndarray:
    """Unit-norm mean of the final hidden states of ``token_ids`` (float32 [hidden])."""
    if not token_ids:
        raise ValueError("input: must not be empty")
    n, padded = len(token_ids), bucket(len(token_ids))
    spec = KVCacheSpec.for_model(model.config, -(-padded // block_size), block_size, model.dtype)
    meta = single_sequence_metadata(padded, 0, spec.num_blocks, block_size)
    ids = jnp.asarray(list(token_ids) + [0] * (padded - n), jnp.int32)
    hidden, _ = forward(model.params, model.config, ids, jnp.arange(padded, dtype=jnp.int32),
                        spec.allocate(), meta)
    pooled = np.asarray(hidden[:n], np.float32).mean(axis=0)
    return pooled / max(float(np.linalg.norm(pooled)), 1e-12)
