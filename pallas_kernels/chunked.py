"""Ragged paged attention for CPU: the reference's semantics, computed a chunk
of pages at a time with an online softmax.

The loop runs only as far as the KV the batch uses (a ``while_loop`` with a
data-dependent trip count), so the block-table width can stay fixed at the
model's maximum without reading padding pages: the engine needs no per-width
compiled shapes, and each step reads about the KV it uses.

By default every sequence advances one chunk per iteration, to the longest
sequence. Prompt pieces (more than one query row) may instead walk a work list
of (sequence, chunk) pairs, as many pairs per iteration as there are sequences:
each piece visits only the chunks its queries can see (up to its last position,
from the sliding window's first), and a piece's pairs that share an iteration
merge their partial softmaxes per sequence. That takes fewer iterations when the
pieces' lengths differ (the pieces of one long prompt see ever more of it:
`bench/prompt_attention.py`, one 512-token prompt, 1.48-1.65x faster than the
plain loop), and costs more per iteration (the merge: forced on equal pieces
it was 1.02-1.19x slower there), so a step takes the work list only when it
needs fewer iterations than the plain loop (never for equal pieces).

Same signature and results as `sluice.pallas_kernels.reference.ragged_paged_attention`
(tested against it), float32 accumulation whatever the input dtype.
"""

from __future__ import annotations

import dataclasses

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
    ppc = min(PAGES_PER_CHUNK, pages)
    tables = jnp.pad(meta.block_tables, ((0, 0), (0, -pages % ppc)))
    qs, q_valid, rows, q_pos = padded_queries(q, meta, num_kv_heads)
    scores = _ChunkScores(qs, q_valid, q_pos, cache, layer, tables, meta.seq_lens, ppc,
                          num_kv_heads, scale, sliding_window, soft_cap)
    if meta.max_query_len == 1:
        l, acc = _by_chunk(scores, meta)
    else:
        work = _WorkList.build(meta, scores.chunk, sliding_window)
        l, acc = jax.lax.cond(_takes_work_list(work, meta, scores.chunk),
                              lambda: _by_work_list(scores, work), lambda: _by_chunk(scores, meta))
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [S, Hkv, G, Qm, D]
    out = jnp.moveaxis(out, 3, 1).reshape(num_seqs, meta.max_query_len, num_q_heads, head_dim)
    return scatter_rows(out, q_valid, rows, q)


class _ChunkScores:
    """Masked scores of some sequences' queries against one KV chunk each."""

    def __init__(self, qs, q_valid, q_pos, cache, layer, tables, seq_lens, ppc, num_kv_heads,
                 scale, sliding_window, soft_cap):
        self.qs, self.q_valid, self.q_pos = qs, q_valid, q_pos
        self.cache, self.layer, self.tables, self.seq_lens = cache, layer, tables, seq_lens
        self.ppc, self.num_kv_heads = ppc, num_kv_heads
        self.chunk = ppc * cache.shape[3]
        self.scale, self.sliding_window, self.soft_cap = scale, sliding_window, soft_cap

    def __call__(self, chunks: jax.Array, seqs: jax.Array | None = None,
                 live: jax.Array | None = None):
        """Scores [B, Hkv, G, Qm, C] (-inf where masked), their mask and the values
        [B, C, Hkv, D] (zero where unused) of sequence ``seqs[b]`` against its chunk
        ``chunks[b]``; items that are not ``live`` are fully masked. ``seqs`` None:
        every sequence in order, all against chunk ``chunks`` (a scalar), read
        without gathering the per-sequence arrays (the decode loop's case)."""
        chunk, nkv = self.chunk, self.num_kv_heads
        if seqs is None:
            pick = lambda x: x  # noqa: E731
            blocks = jax.lax.dynamic_slice_in_dim(self.tables, chunks * self.ppc, self.ppc, axis=1)
            kv_pos = (chunks * chunk + jnp.arange(chunk))[None]  # [1, C]
            in_use = True
        else:
            pick = lambda x: x[seqs]  # noqa: E731
            blocks = self.tables[seqs[:, None], chunks[:, None] * self.ppc + jnp.arange(self.ppc)]
            kv_pos = chunks[:, None] * chunk + jnp.arange(chunk)  # [B, C]
            in_use = live[:, None]
        b = blocks.shape[0]
        k, v = (self.cache[blocks, self.layer, kv, :, :nkv].reshape(b, chunk, nkv, -1)
                for kv in (0, 1))
        kv_valid = (kv_pos < pick(self.seq_lens)[:, None]) & in_use
        q_pos = pick(self.q_pos)
        mask = (kv_pos[:, None, :] <= q_pos[:, :, None]) & kv_valid[:, None, :] \
            & pick(self.q_valid)[:, :, None]
        if self.sliding_window is not None:
            mask &= kv_pos[:, None, :] > q_pos[:, :, None] - self.sliding_window
        mask = mask[:, None, None]  # [B, 1, 1, Qm, C]
        v = jnp.where(kv_valid[:, :, None, None], v.astype(jnp.float32), 0.0)
        s = jnp.einsum("sqhgd,skhd->shgqk", pick(self.qs), k.astype(jnp.float32)) * self.scale
        if self.soft_cap is not None:
            s = self.soft_cap * jnp.tanh(s / self.soft_cap)
        return jnp.where(mask, s, -jnp.inf), mask, v

    def stats_shape(self) -> tuple[int, ...]:
        s, qm, nkv, group, _ = self.qs.shape
        return (s, nkv, group, qm)


def _finite_or_zero(m: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(m), m, 0.0)


def _chunk_trips(meta: AttentionMetadata, chunk: int) -> jax.Array:
    return (jnp.max(meta.seq_lens) + chunk - 1) // chunk


def _takes_work_list(work: "_WorkList", meta: AttentionMetadata, chunk: int) -> jax.Array:
    """Whether the work list needs fewer iterations than the plain loop."""
    return work.trips < _chunk_trips(meta, chunk)


def _by_chunk(scores: _ChunkScores, meta: AttentionMetadata):
    """Every sequence advances one chunk per iteration, to the longest one."""
    def body(carry):
        c, m, l, acc = carry
        s, mask, v = scores(c)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = _finite_or_zero(m_new)
        p = jnp.where(mask, jnp.exp(s - m_safe[..., None]), 0.0)
        rescale = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
        l = l * rescale + jnp.sum(p, axis=-1)
        acc = acc * rescale[..., None] + jnp.einsum("shgqk,skhd->shgqd", p, v)
        return c + 1, m_new, l, acc

    shape = scores.stats_shape()
    init = (jnp.asarray(0, jnp.int32), jnp.full(shape, -jnp.inf, jnp.float32),
            jnp.zeros(shape, jnp.float32), jnp.zeros(shape + (scores.qs.shape[-1],), jnp.float32))
    num_chunks = _chunk_trips(meta, scores.chunk)
    _, _, l, acc = jax.lax.while_loop(lambda carry: carry[0] < num_chunks, body, init)
    return l, acc


@dataclasses.dataclass(frozen=True)
class _WorkList:
    """The (sequence, chunk) pairs to visit: sequence s's chunks ``lo[s]`` ..
    ``lo[s] + count[s] - 1``, the pairs in sequence order (``ends``: running count)."""

    lo: jax.Array
    count: jax.Array
    ends: jax.Array
    trips: jax.Array  # iterations at one pair per sequence each

    @classmethod
    def build(cls, meta: AttentionMetadata, chunk: int, sliding_window: int | None) -> "_WorkList":
        num_seqs = meta.seq_lens.shape[0]
        q_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]
        hi = (meta.seq_lens + chunk - 1) // chunk  # past the chunk of the last position
        lo = jnp.zeros_like(hi)
        if sliding_window is not None:  # the chunk of the first key any query sees
            lo = jnp.maximum(meta.seq_lens - q_lens - sliding_window + 1, 0) // chunk
        count = jnp.where(q_lens > 0, jnp.maximum(hi - lo, 0), 0)
        ends = jnp.cumsum(count)
        return cls(lo, count, ends, (ends[-1] + num_seqs - 1) // num_seqs)


def _by_work_list(scores: _ChunkScores, work: _WorkList):
    """The work list's pairs, one per sequence slot per iteration, merged per sequence."""
    lo, count, ends = work.lo, work.count, work.ends
    num_seqs = lo.shape[0]
    total = ends[-1]

    def body(carry):
        t, m, l, acc = carry
        item = t * num_seqs + jnp.arange(num_seqs)
        live = item < total
        seqs = jnp.minimum(jnp.searchsorted(ends, item, side="right"), num_seqs - 1)
        chunks = jnp.where(live, lo[seqs] + item - (ends[seqs] - count[seqs]), 0)
        s, mask, v = scores(chunks, seqs, live)
        m_item = jnp.max(s, axis=-1)  # [B, Hkv, G, Qm]
        p = jnp.where(mask, jnp.exp(s - _finite_or_zero(m_item)[..., None]), 0.0)
        ids = jnp.where(live, seqs, num_seqs)  # dead items merge into nothing
        m_new = jnp.maximum(m, jax.ops.segment_max(m_item, ids, num_seqs))
        m_safe = _finite_or_zero(m_new)
        w_old = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
        w_item = jnp.where(jnp.isfinite(m_item), jnp.exp(m_item - m_safe[seqs]), 0.0)
        l = l * w_old + jax.ops.segment_sum(jnp.sum(p, axis=-1) * w_item, ids, num_seqs)
        pv = jnp.einsum("shgqk,skhd->shgqd", p, v) * w_item[..., None]
        acc = acc * w_old[..., None] + jax.ops.segment_sum(pv, ids, num_seqs)
        return t + 1, m_new, l, acc

    shape = scores.stats_shape()
    init = (jnp.asarray(0, jnp.int32), jnp.full(shape, -jnp.inf, jnp.float32),
            jnp.zeros(shape, jnp.float32), jnp.zeros(shape + (scores.qs.shape[-1],), jnp.float32))
    _, _, l, acc = jax.lax.while_loop(lambda carry: carry[0] < work.trips, body, init)
    return l, acc
