"""`pallas_kernels.reference` (and `pallas_kernels.chunked`, the CPU path that
must agree with it) against a naive dense per-sequence numpy implementation, on random ragged paged batches built to be awkward: decode rows
mixed with prefill chunks, KV lengths off block boundaries, shuffled
non-contiguous pages, padding sequences and padding tokens, and every slot no
live sequence owns (other layers included) filled with NaN."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sluice.pallas_kernels import chunked
from sluice.pallas_kernels.metadata import AttentionMetadata
from sluice.pallas_kernels.reference import ragged_paged_attention, write_kv

NUM_LAYERS, LAYER = 3, 1
HEAD_DIM = 16
# (query rows, KV length after this step) per live sequence, in batch order:
# decodes, a fresh prefill, chunked-prefill continuations, a 1-token prompt, and
# one length on a block boundary.
SEQS = [(1, 13), (7, 7), (5, 22), (1, 1), (1, 31), (9, 17), (3, 16), (1, 40)]
PAD_SEQS, PAD_TOKENS = 2, 3


@dataclasses.dataclass
class Batch:
    q: np.ndarray            # [T, Hq, D], padding rows NaN
    k_new: np.ndarray        # [T, Hkv, D] this step's keys (padding rows NaN)
    v_new: np.ndarray
    keys: list               # per sequence, [kv_len, Hkv, D] full keys
    values: list
    cache_before: np.ndarray  # context (pre-step tokens) written, NaN elsewhere
    cache_full: np.ndarray    # all tokens written, NaN elsewhere
    meta: AttentionMetadata
    num_slots: int


def make_batch(seed: int, *, block_size: int, num_kv_heads: int, group: int,
               dtype=np.float32) -> Batch:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(SEQS))
    seqs = [SEQS[i] for i in order]
    S = len(seqs) + PAD_SEQS
    pages_needed = [-(-kv // block_size) for _, kv in seqs]
    P = max(pages_needed) + 1  # some table entries are always unused
    num_blocks = sum(pages_needed) + 5  # spare pages stay NaN
    perm = rng.permutation(num_blocks)  # shuffled, non-contiguous page assignment
    tables = rng.integers(0, num_blocks, size=(S, P))  # unused entries: arbitrary pages
    shape = (num_blocks, NUM_LAYERS, 2, block_size, num_kv_heads, HEAD_DIM)
    cache_before = np.full(shape, np.nan, dtype)
    cache_full = np.full(shape, np.nan, dtype)

    nq = num_kv_heads * group
    T = sum(q for q, _ in seqs) + PAD_TOKENS
    q = np.full((T, nq, HEAD_DIM), np.nan, dtype)
    k_new = np.full((T, num_kv_heads, HEAD_DIM), np.nan, dtype)
    v_new = np.full((T, num_kv_heads, HEAD_DIM), np.nan, dtype)
    slots = np.empty(T, np.int64)
    keys, values, qsl = [], [], [0]
    used = 0
    for s, ((ql, kv), npages) in enumerate(zip(seqs, pages_needed)):
        tables[s, :npages] = perm[used:used + npages]
        used += npages
        k = rng.normal(size=(kv, num_kv_heads, HEAD_DIM)).astype(dtype)
        v = rng.normal(size=(kv, num_kv_heads, HEAD_DIM)).astype(dtype)
        keys.append(k)
        values.append(v)
        for pos in range(kv):
            blk, off = tables[s, pos // block_size], pos % block_size
            cache_full[blk, LAYER, 0, off], cache_full[blk, LAYER, 1, off] = k[pos], v[pos]
            if pos < kv - ql:
                cache_before[blk, LAYER, 0, off] = k[pos]
                cache_before[blk, LAYER, 1, off] = v[pos]
        lo = qsl[-1]
        # Large queries so that scores reach the soft cap's non-linear range.
        q[lo:lo + ql] = 3.0 * rng.normal(size=(ql, nq, HEAD_DIM))
        k_new[lo:lo + ql], v_new[lo:lo + ql] = k[kv - ql:], v[kv - ql:]
        for i, pos in enumerate(range(kv - ql, kv)):
            slots[lo + i] = tables[s, pos // block_size] * block_size + pos % block_size
        qsl.append(lo + ql)
    num_slots = num_blocks * block_size
    # Padding tokens: slots at and well beyond the end of the pool.
    slots[qsl[-1]:] = [num_slots, num_slots + block_size + 3, 2**31 - 1][:PAD_TOKENS]
    qsl += [qsl[-1]] * PAD_SEQS
    seq_lens = [kv for _, kv in seqs] + [0] * PAD_SEQS
    meta = AttentionMetadata(
        slot_mapping=jnp.asarray(slots, jnp.int32),
        query_start_loc=jnp.asarray(qsl, jnp.int32),
        seq_lens=jnp.asarray(seq_lens, jnp.int32),
        block_tables=jnp.asarray(tables, jnp.int32),
        num_seqs=jnp.asarray(len(seqs), jnp.int32),
        max_query_len=max(q for q, _ in seqs) + 2,  # a loose static bound
    )
    return Batch(q, k_new, v_new, keys, values, cache_before, cache_full, meta, num_slots)


def naive_attention(b: Batch, *, scale, sliding_window=None, soft_cap=None) -> np.ndarray:
    """Dense causal attention, one sequence and one head at a time, float64."""
    T, nq, _ = b.q.shape
    out = np.zeros((T, nq, HEAD_DIM))
    starts = np.asarray(b.meta.query_start_loc)
    group = nq // b.keys[0].shape[1]
    for s, (keys, values) in enumerate(zip(b.keys, b.values)):
        kv_len, ql = len(keys), starts[s + 1] - starts[s]
        for i in range(ql):
            pos = kv_len - ql + i
            lo = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
            for h in range(nq):
                k = keys[lo:pos + 1, h // group].astype(np.float64)
                v = values[lo:pos + 1, h // group].astype(np.float64)
                scores = k @ b.q[starts[s] + i, h].astype(np.float64) * scale
                if soft_cap is not None:
                    scores = soft_cap * np.tanh(scores / soft_cap)
                p = np.exp(scores - scores.max())
                out[starts[s] + i, h] = (p / p.sum()) @ v
    return out


IMPLS = {"reference": ragged_paged_attention, "chunked": chunked.ragged_paged_attention}


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "soft_cap", "impl"))
def _attend(q, cache, layer, meta, scale, sliding_window, soft_cap, impl="reference"):
    return IMPLS[impl](q, cache, layer, meta, scale=scale, sliding_window=sliding_window,
                       soft_cap=soft_cap)


_write = jax.jit(write_kv)

CASES = [
    # (block_size, num_kv_heads, group, sliding_window, soft_cap)
    (4, 2, 1, None, None),
    (4, 1, 4, None, None),
    (8, 2, 4, 5, None),
    (4, 2, 1, 6, None),
    (8, 2, 1, None, 2.0),
    (4, 1, 4, 3, 2.0),
    (16, 2, 4, None, None),
]


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("case", range(len(CASES)))
def test_attention_matches_naive(case, impl):
    block_size, num_kv_heads, group, window, cap = CASES[case]
    b = make_batch(case, block_size=block_size, num_kv_heads=num_kv_heads, group=group)
    scale = HEAD_DIM ** -0.5
    out = np.asarray(_attend(jnp.asarray(b.q), jnp.asarray(b.cache_full),
                             jnp.asarray(LAYER, jnp.int32), b.meta, scale, window, cap, impl))
    assert out.shape == b.q.shape and out.dtype == np.float32
    assert np.isfinite(out).all()
    expected = naive_attention(b, scale=scale, sliding_window=window, soft_cap=cap)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    live = int(np.asarray(b.meta.query_start_loc)[len(SEQS)])
    assert not out[live:].any(), "padding rows must be zero"


@pytest.mark.parametrize("work_list", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_chunked_loops_both_match_naive(case, work_list, monkeypatch):
    """`chunked` picks, per step, the plain chunk loop or the (sequence, chunk) work
    list for prompt pieces; each one alone, forced, agrees with the naive attention."""
    monkeypatch.setattr(chunked, "_takes_work_list", lambda *a: jnp.asarray(work_list))
    block_size, num_kv_heads, group, window, cap = CASES[case]
    b = make_batch(case, block_size=block_size, num_kv_heads=num_kv_heads, group=group)
    scale = HEAD_DIM ** -0.5
    attend = jax.jit(functools.partial(chunked.ragged_paged_attention, scale=scale,
                                       sliding_window=window, soft_cap=cap))
    out = np.asarray(attend(jnp.asarray(b.q), jnp.asarray(b.cache_full),
                            jnp.asarray(LAYER, jnp.int32), b.meta))
    expected = naive_attention(b, scale=scale, sliding_window=window, soft_cap=cap)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    live = int(np.asarray(b.meta.query_start_loc)[len(SEQS)])
    assert not out[live:].any(), "padding rows must be zero"


def test_chunked_takes_the_work_list_only_when_it_saves_iterations():
    """One long prompt's 8 pieces (the first sees 1 chunk, the last 8): the work
    list, 36 pairs in 5 iterations instead of 8; equal pieces: the plain loop."""
    chunk = chunked.PAGES_PER_CHUNK * 16
    pieces = 8
    def meta(seq_lens):
        qsl = np.arange(pieces + 1) * 32
        return AttentionMetadata(jnp.zeros(pieces * 32, jnp.int32), jnp.asarray(qsl, jnp.int32),
                                 jnp.asarray(seq_lens, jnp.int32),
                                 jnp.zeros((pieces, 40), jnp.int32), jnp.asarray(pieces, jnp.int32), 32)
    long = meta(np.arange(1, pieces + 1) * chunk)  # pieces ending at chunk 1, 2, ..., 8
    work = chunked._WorkList.build(long, chunk, None)
    assert int(work.ends[-1]) == 36 and int(work.trips) == 5
    assert bool(chunked._takes_work_list(work, long, chunk))
    equal = meta(np.full(pieces, 2 * chunk))
    assert not bool(chunked._takes_work_list(chunked._WorkList.build(equal, chunk, None), equal,
                                             chunk))
    windowed = chunked._WorkList.build(long, chunk, 2 * chunk)  # a window skips early chunks
    assert int(windowed.ends[-1]) < 36


def test_window_and_cap_change_the_result():
    """Guard the matrix: the windows and caps used above are not no-ops."""
    b = make_batch(0, block_size=4, num_kv_heads=2, group=1)
    scale = HEAD_DIM ** -0.5
    plain = naive_attention(b, scale=scale)
    assert np.abs(plain - naive_attention(b, scale=scale, sliding_window=6)).max() > 0.1
    assert np.abs(plain - naive_attention(b, scale=scale, soft_cap=2.0)).max() > 0.1
    got = np.asarray(_attend(jnp.asarray(b.q), jnp.asarray(b.cache_full),
                             jnp.asarray(LAYER, jnp.int32), b.meta, scale, 6, None))
    assert np.abs(got - plain).max() > 0.1


@pytest.mark.parametrize("block_size, num_kv_heads", [(4, 2), (8, 1)])
def test_write_kv_is_exact_and_drops_padding(block_size, num_kv_heads):
    b = make_batch(7, block_size=block_size, num_kv_heads=num_kv_heads, group=1)
    written = np.asarray(_write(jnp.asarray(b.cache_before), jnp.asarray(LAYER, jnp.int32),
                                jnp.asarray(b.k_new), jnp.asarray(b.v_new), b.meta.slot_mapping))
    # Exactly the pre-step context plus this step's tokens; NaN everywhere else
    # (padding rows carry NaN keys, so a clamped write would show up).
    np.testing.assert_array_equal(written, b.cache_full)
    assert np.asarray(b.meta.slot_mapping)[-PAD_TOKENS:].min() >= b.num_slots


def test_write_kv_into_other_layer_and_dtype():
    """The layer index is honoured and values are cast to the pool's dtype."""
    b = make_batch(3, block_size=4, num_kv_heads=2, group=1)
    cache = jnp.zeros(b.cache_full.shape, jnp.bfloat16)
    out = np.asarray(write_kv(cache, 2, jnp.asarray(b.k_new), jnp.asarray(b.v_new),
                              b.meta.slot_mapping).astype(jnp.float32))
    slots = np.asarray(b.meta.slot_mapping)[:-PAD_TOKENS]
    blocks, offs = slots // 4, slots % 4
    def bf16(x):
        return np.asarray(jnp.asarray(x[:-PAD_TOKENS]).astype(jnp.bfloat16).astype(jnp.float32))

    expected = np.zeros(out.shape, np.float32)
    expected[blocks, 2, 0, offs] = bf16(b.k_new)
    expected[blocks, 2, 1, offs] = bf16(b.v_new)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("group, window", [(1, None), (4, 5)])
def test_write_then_attend(group, window):
    """One model step: write this step's K/V into a pool holding only the
    context, then attend; equals dense attention over the whole sequences."""
    b = make_batch(11 + group, block_size=4, num_kv_heads=2, group=group)
    scale = HEAD_DIM ** -0.5

    @jax.jit
    def step(cache, q, k, v, meta):
        cache = write_kv(cache, LAYER, k, v, meta.slot_mapping)
        return ragged_paged_attention(q, cache, LAYER, meta, scale=scale, sliding_window=window)

    out = np.asarray(step(jnp.asarray(b.cache_before), jnp.asarray(b.q), jnp.asarray(b.k_new),
                          jnp.asarray(b.v_new), b.meta))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, naive_attention(b, scale=scale, sliding_window=window),
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_queries_return_bfloat16():
    b = make_batch(5, block_size=8, num_kv_heads=1, group=4)
    scale = HEAD_DIM ** -0.5
    out = _attend(jnp.asarray(b.q).astype(jnp.bfloat16),
                  jnp.asarray(b.cache_full).astype(jnp.bfloat16), LAYER, b.meta, scale, None, None)
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, naive_attention(b, scale=scale), atol=0.1, rtol=0.05)
