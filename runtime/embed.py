"""Sentence embeddings from a causal LM: the mean of the final-normed hidden
states over a sequence's tokens, L2-normalized (``/v1/embeddings`` serves this
until a dedicated embedding model lands).

``mean_pooled(model, token_ids) -> np.ndarray [hidden]`` runs the model's layers
(`sluice.runtime.model.forward_unjitted`) on a private KV pool, the way
``Model.logits`` does, so it never touches the engine's pool or its schedule.
The sequence is padded at the end to a power-of-two bucket and the pooling is
inside the same jitted program, with the real length as a traced value, so a
server compiles one program per bucket, not per length; causal attention means
the padding cannot change the hidden states of the real tokens, which are the
only ones averaged. ``warmup(model, max_len)`` compiles every bucket up to
``max_len`` tokens without running them (``sluice serve`` calls it unless
``--no-warmup``), so a first embeddings request compiles nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sluice.runtime import compiles
from sluice.runtime.config import ModelConfig
from sluice.runtime.kv_cache import KVCacheSpec
from sluice.runtime.loader import Model, single_sequence_metadata
from sluice.runtime.model import forward_unjitted

MIN_BUCKET = 16


def bucket(n: int) -> int:
    """The padded length for ``n`` tokens: a power of two, at least `MIN_BUCKET`."""
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def buckets(max_len: int) -> list[int]:
    """Every padded length of inputs of at most ``max_len`` tokens."""
    out = [MIN_BUCKET]
    while out[-1] < bucket(max_len):
        out.append(out[-1] * 2)
    return out


def mean_pooled(model: Model, token_ids: list[int], block_size: int = 16) -> np.ndarray:
    """Unit-norm mean of the final hidden states of ``token_ids`` (float32 [hidden])."""
    if not token_ids:
        raise ValueError("input: must not be empty")
    args, static = _inputs(model, list(token_ids), block_size)
    return np.asarray(_pooled(*args, **static))


def warmup(model: Model, max_len: int, block_size: int = 16) -> None:
    """Compile the program of every bucket up to ``max_len`` tokens (nothing runs),
    several at once (`compiles.compile_ahead`)."""
    def lower(padded: int) -> jax.stages.Lowered:
        args, static = _inputs(model, [0] * padded, block_size)
        return _pooled.lower(*args, **static)

    with compiles.warming_up():
        compiles.compile_ahead([functools.partial(lower, n) for n in buckets(max_len)],
                               "compiling embedding programs")


def _inputs(model: Model, token_ids: list[int], block_size: int) -> tuple[tuple, dict]:
    """The arguments of `_pooled` for ``token_ids``, built the same way for a call
    and for `warmup`, so both meet the same compiled program."""
    n, padded = len(token_ids), bucket(len(token_ids))
    spec = KVCacheSpec.for_model(model.config, -(-padded // block_size), block_size, model.dtype)
    ids = np.asarray(token_ids + [0] * (padded - n), np.int32)
    return (model.params, ids, np.int32(n)), {"cfg": model.config, "spec": spec}


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def _pooled(params, token_ids: jax.Array, n: jax.Array, *, cfg: ModelConfig,
            spec: KVCacheSpec) -> jax.Array:
    padded = token_ids.shape[0]
    meta = single_sequence_metadata(padded, 0, spec.num_blocks, spec.block_size)
    hidden, _ = forward_unjitted(params, cfg, token_ids, jnp.arange(padded, dtype=jnp.int32),
                                 jnp.zeros(spec.shape, spec.dtype), meta)
    real = (jnp.arange(padded) < n)[:, None]
    pooled = jnp.sum(jnp.where(real, hidden.astype(jnp.float32), 0.0), 0) / n
    return pooled / jnp.maximum(jnp.linalg.norm(pooled), 1e-12)
