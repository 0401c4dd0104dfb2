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


def ragged_paged_attention(q: jax.Array, cache: jax.Array, layer: jax.Array | int,
                           meta: AttentionMetadata, *, scale: float,
                           sliding_window: int | None = None,
                           soft_cap: float | None = None) -> jax.Array:
    """Causal attention of ragged queries [T, q_heads, head_dim] over paged KV.

    Each sequence's queries are the last ``qlen`` positions of its ``seq_lens``
    tokens. Computed in float32; returns q's dtype. Padding rows return zeros.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs, pages = meta.block_tables.shape
    block_size, num_kv_heads = cache.shape[3], cache.shape[4]
    group = num_q_heads // num_kv_heads
    max_q = meta.max_query_len
    max_kv = pages * block_size

    # Gather each sequence's pages: [S, P*B, Hkv, D] (keys and values separately,
    # which avoids slicing a gathered [S, P, 2, ...] copy).
    keys = cache[meta.block_tables, layer, 0].reshape(num_seqs, max_kv, num_kv_heads, head_dim)
    values = cache[meta.block_tables, layer, 1].reshape(num_seqs, max_kv, num_kv_heads, head_dim)
    keys, values = keys.astype(jnp.float32), values.astype(jnp.float32)

    # Gather each sequence's queries into a padded [S, max_q] layout.
    starts = meta.query_start_loc[:-1]
    q_lens = meta.query_start_loc[1:] - starts
    i = jnp.arange(max_q)
    q_valid = i[None, :] < q_lens[:, None]  # [S, Qm]
    rows = jnp.where(q_valid, starts[:, None] + i[None, :], 0)
    qs = q[rows].astype(jnp.float32).reshape(num_seqs, max_q, num_kv_heads, group, head_dim)

    q_pos = meta.seq_lens[:, None] - q_lens[:, None] + i[None, :]  # [S, Qm]
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
    out = jnp.einsum("shgqk,skhd->sqhgd", probs, values).reshape(num_seqs, max_q, num_q_heads, head_dim)

    # Scatter back to the flat rows; padding rows stay zero.
    flat_rows = jnp.where(q_valid, rows, num_tokens)
    result = jnp.zeros((num_tokens, num_q_heads, head_dim), jnp.float32)
    result = result.at[flat_rows].set(out, mode="drop")
    return result.astype(q.dtype)


def gather_blocks(cache: jax.Array, block_ids: jax.Array) -> jax.Array:
    """Copy blocks ``block_ids`` [N] (all layers, keys and values) into a staging
    buffer [N, num_layers, 2, block_size, kv_heads, head_dim], in list order."""
    return cache[block_ids]


def scatter_blocks(cache: jax.Array, block_ids: jax.Array, staging: jax.Array) -> jax.Array:
    """Inverse of `gather_blocks`: write staging row ``i`` to block ``block_ids[i]``."""
    return cache.at[block_ids].set(staging.astype(cache.dtype))
