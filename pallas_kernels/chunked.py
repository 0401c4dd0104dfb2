"""Ragged paged attention for CPU: the reference's semantics, computed a chunk
of pages at a time with an online softmax.

The loop runs only as far as the longest sequence in the batch (a
``while_loop`` with a data-dependent trip count), so the block-table width can
stay fixed at the model's maximum without reading padding pages: the engine
needs no per-width compiled shapes, and each step reads about the KV it uses.
Same signature and results as `sluice.pallas_kernels.reference.ragged_paged_attention`
(tested against it), float32 accumulation whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sluice.pallas_kernels.metadata import AttentionMetadata
from sluice.pallas_kernels.pool_layout import pads_queries
from sluice.pallas_kernels.reference import padded_queries, scatter_rows

PAGES_PER_CHUNK = 4


@pads_queries
def ragged_paged_attention(q: jax.Array, cache: jax.Array, layer: jax.Array | int,
                           meta: AttentionMetadata, *, scale: float,
                           sliding_window: int | None = None,
                           soft_cap: float | None = None, num_kv_heads: int) -> jax.Array:
    _, num_q_heads, head_dim = q.shape
    num_seqs, pages = meta.block_tables.shape
    block_size = cache.shape[3]
    group = num_q_heads // num_kv_heads
    max_q = meta.max_query_len
    ppc = min(PAGES_PER_CHUNK, pages)
    tables = jnp.pad(meta.block_tables, ((0, 0), (0, -pages % ppc)))
    chunk = ppc * block_size

    qs, q_valid, rows, q_pos = padded_queries(q, meta, num_kv_heads)

    def body(carry):
        c, m, l, acc = carry
        blocks = jax.lax.dynamic_slice_in_dim(tables, c * ppc, ppc, axis=1)
        k, v = (cache[blocks, layer, kv, :, :num_kv_heads].reshape(
            num_seqs, chunk, num_kv_heads, head_dim) for kv in (0, 1))
        kv_pos = c * chunk + jnp.arange(chunk)
        kv_valid = kv_pos[None, :] < meta.seq_lens[:, None]  # [S, C]
        mask = (kv_pos[None, None, :] <= q_pos[:, :, None]) & kv_valid[:, None, :] \
            & q_valid[:, :, None]
        if sliding_window is not None:
            mask &= kv_pos[None, None, :] > q_pos[:, :, None] - sliding_window
        mask = mask[:, None, None]  # [S, 1, 1, Qm, C]
        v = jnp.where(kv_valid[:, :, None, None], v.astype(jnp.float32), 0.0)
        s = jnp.einsum("sqhgd,skhd->shgqk", qs, k.astype(jnp.float32)) * scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.where(mask, jnp.exp(s - m_safe[..., None]), 0.0)
        rescale = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
        l = l * rescale + jnp.sum(p, axis=-1)
        acc = acc * rescale[..., None] + jnp.einsum("shgqk,skhd->shgqd", p, v)
        return c + 1, m_new, l, acc

    stats_shape = (num_seqs, num_kv_heads, group, max_q)
    init = (jnp.asarray(0, jnp.int32), jnp.full(stats_shape, -jnp.inf, jnp.float32),
            jnp.zeros(stats_shape, jnp.float32), jnp.zeros(stats_shape + (head_dim,), jnp.float32))
    num_chunks = (jnp.max(meta.seq_lens) + chunk - 1) // chunk
    _, _, l, acc = jax.lax.while_loop(lambda carry: carry[0] < num_chunks, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [S, Hkv, G, Qm, D]
    out = jnp.moveaxis(out, 3, 1).reshape(num_seqs, max_q, num_q_heads, head_dim)
    return scatter_rows(out, q_valid, rows, q)
