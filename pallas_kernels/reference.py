"""Pure-JAX reference implementations of the paged KV cache operations.

These define the semantics the Pallas kernels are tested against. The KV pool
is one array ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``
(index 0 of axis 2 holds keys, 1 values), so one block's keys and values for
every layer form a single contiguous slab that can be copied as a unit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sluice.pallas_kernels.metadata import AttentionMetadata
from sluice.pallas_kernels.pool_layout import pads_queries, pads_rows


@pads_rows
def write_kv(cache: jax.Array, layer: jax.Array | int, k: jax.Array, v: jax.Array,
             slot_mapping: jax.Array) -> jax.Array:
    """Write keys/values [T, kv_heads, head_dim] of ``layer`` to their slots.

    Slots out of range (padding tokens) are dropped, never clamped.
    """
    block_size = cache.shape[3]
    blocks = slot_mapping // block_size
    offsets = slot_mapping % block_size
    # Padding slots are >= num_slots, so their block index is out of range.
    cache = cache.at[blocks, layer, 0, offsets].set(k.astype(cache.dtype), mode="drop")
    return cache.at[blocks, layer, 1, offsets].set(v.astype(cache.dtype), mode="drop")


@pads_queries
def ragged_paged_attention(q: jax.Array, cache: jax.Array, layer: jax.Array | int,
                           meta: AttentionMetadata, *, scale: float,
                           sliding_window: int | None = None,
                           soft_cap: float | None = None, num_kv_heads: int) -> jax.Array:
    """Causal attention of ragged queries [T, q_heads, head_dim] over paged KV.

    Each sequence's queries are the last ``qlen`` positions of its ``seq_lens``
    tokens; the query heads share the pool's first ``num_kv_heads`` heads in
    equal groups (`pool_layout.pads_queries`: None there is the pool's count).
    Computed in float32; returns q's dtype. Padding rows return zeros.
    """
    _, num_q_heads, head_dim = q.shape
    num_seqs, pages = meta.block_tables.shape
    block_size = cache.shape[3]
    max_q = meta.max_query_len
    max_kv = pages * block_size

    # Gather each sequence's pages: [S, P*B, Hkv, D] (keys and values separately,
    # which avoids slicing a gathered [S, P, 2, ...] copy).
    keys, values = (cache[meta.block_tables, layer, kv, :, :num_kv_heads].reshape(
        num_seqs, max_kv, num_kv_heads, head_dim) for kv in (0, 1))
    keys, values = keys.astype(jnp.float32), values.astype(jnp.float32)

    qs, q_valid, rows, q_pos = padded_queries(q, meta, num_kv_heads)
    kv_pos = jnp.arange(max_kv)
    kv_valid = kv_pos[None, :] < meta.seq_lens[:, None]  # [S, K]
    mask = (kv_pos[None, None, :] <= q_pos[:, :, None]) & kv_valid[:, None, :] & q_valid[:, :, None]
    if sliding_window is not None:
        mask &= kv_pos[None, None, :] > q_pos[:, :, None] - sliding_window

    # Unused pages may hold anything (even NaN): zero them before they meet probabilities.
    values = jnp.where(kv_valid[:, :, None, None], values, 0.0)
    scores = jnp.einsum("sqhgd,skhd->shgqk", qs, keys) * scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    mask = mask[:, None, None]  # [S, 1, 1, Qm, K]
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    probs = jnp.where(mask, jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0)), 0.0)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("shgqk,skhd->sqhgd", probs, values)
    return scatter_rows(out.reshape(num_seqs, max_q, num_q_heads, head_dim), q_valid, rows, q)


def padded_queries(q: jax.Array, meta: AttentionMetadata, num_kv_heads: int):
    """Each sequence's query rows in a padded layout.

    Returns (queries [S, Qm, kv_heads, group, D] float32, valid [S, Qm], flat row
    of each slot [S, Qm], KV position of each slot [S, Qm]).
    """
    num_seqs = meta.seq_lens.shape[0]
    starts = meta.query_start_loc[:-1]
    q_lens = meta.query_start_loc[1:] - starts
    i = jnp.arange(meta.max_query_len)
    valid = i[None, :] < q_lens[:, None]
    rows = jnp.where(valid, starts[:, None] + i[None, :], 0)
    qs = q[rows].astype(jnp.float32).reshape(num_seqs, meta.max_query_len, num_kv_heads, -1,
                                             q.shape[-1])
    return qs, valid, rows, meta.seq_lens[:, None] - q_lens[:, None] + i[None, :]


def scatter_rows(out: jax.Array, valid: jax.Array, rows: jax.Array, q: jax.Array) -> jax.Array:
    """Padded per-sequence outputs [S, Qm, H, D] back to q's flat rows and dtype;
    padding rows are zero."""
    num_tokens = q.shape[0]
    flat_rows = jnp.where(valid, rows, num_tokens)
    result = jnp.zeros(q.shape, jnp.float32).at[flat_rows].set(out, mode="drop")
    return result.astype(q.dtype)


def gather_blocks(cache: jax.Array, block_ids: jax.Array) -> jax.Array:
    """Copy blocks ``block_ids`` [N] (all layers, keys and values) into a staging
    buffer [N, num_layers, 2, block_size, kv_heads, head_dim], in list order."""
    return cache[block_ids]


def scatter_blocks(cache: jax.Array, block_ids: jax.Array, staging: jax.Array) -> jax.Array:
    """Inverse of `gather_blocks`: write staging row ``i`` to block ``block_ids[i]``."""
    return cache.at[block_ids].set(staging.astype(cache.dtype))
