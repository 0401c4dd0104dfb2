"""The kernels `dispatch` compiles for this machine's default device, run
against the reference: Triton on a GPU, Mosaic on a TPU (both compiled, not
interpreted), the pure-JAX path on CPU. On CPU it checks the dispatch
primitives end to end (jit, eager, donation); bench/gpu_device_check.sh runs it
on an H100/H200, where it is the only test of the compiled GPU kernels'
numerics. Batches and tolerances as in test_kernels (NaN wherever no live
sequence's data is)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sluice.pallas_kernels import block_copy, dispatch, reference
from sluice.pallas_kernels.pool_layout import pool_head_dim, pool_kv_heads
from test_kernels import DECODE, GROUPS, LAYER, MIXED, NUM_KV_HEADS, TOLERANCE, make_batch

# A few long decodes: on GPU 4 programs (2 tiles x 2 KV heads), so the kernel
# takes its KV split (`ragged_attention.kv_splits`: 7 parts here).
LONG_DECODE = [(1, 4000), (1, 2500), (1, 700)]
CASES = [  # seqs, group, head_dim, dtype, sliding window, soft cap
    (MIXED, 4, 128, jnp.bfloat16, 9, 20.0),
    (DECODE, 8, 64, jnp.float32, None, 30.0),
    (MIXED, 2, 96, jnp.bfloat16, None, None),  # GPU: the documented pure-JAX fallback
    (LONG_DECODE, 4, 128, jnp.bfloat16, 1024, 30.0),
    (LONG_DECODE, 4, 64, jnp.float32, None, None),
]
SEQ_NAMES = {id(MIXED): "mixed", id(DECODE): "decode", id(LONG_DECODE): "long-decode"}


@pytest.mark.parametrize("seqs,group,head_dim,dtype,window,cap", CASES,
                         ids=[f"{SEQ_NAMES[id(c[0])]}-g{c[1]}-d{c[2]}-"
                              f"{jnp.dtype(c[3]).name}" for c in CASES])
def test_attention_on_device(seqs, group, head_dim, dtype, window, cap):
    q, cache, meta = make_batch(7 * head_dim + group, seqs, group=group, head_dim=head_dim,
                                dtype=dtype)
    kw = dict(scale=head_dim ** -0.5, sliding_window=window, soft_cap=cap)
    out = jax.jit(lambda q, c, m: dispatch.ragged_paged_attention(q, c, LAYER, m, **kw))(
        q, cache, meta)
    want = reference.ragged_paged_attention(q, cache, LAYER, meta, **kw)
    out, want = np.asarray(out, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("head_dim", [128, 96])
def test_write_kv_and_block_copies_on_device(head_dim):
    rng = np.random.default_rng(head_dim)
    shape = (24, 2, 2, 16, NUM_KV_HEADS, head_dim)
    cache = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
    slots = jnp.asarray(np.concatenate([rng.choice(24 * 16, 9, replace=False), [24 * 16]]),
                        jnp.int32)
    k, v = (jnp.asarray(rng.normal(size=(10, NUM_KV_HEADS, head_dim)), jnp.bfloat16)
            for _ in range(2))
    want = np.asarray(reference.write_kv(cache, LAYER, k, v, slots), np.float32)
    out = jax.jit(lambda c, k, v, s: dispatch.write_kv(c, LAYER, k, v, s), donate_argnums=0)(
        jnp.array(cache), k, v, slots)
    np.testing.assert_array_equal(np.asarray(out, np.float32), want)

    ids = block_copy.expand_groups(GROUPS)
    groups = block_copy.groups_array(GROUPS, max_groups=8)
    staged = jax.jit(dispatch.gather_blocks, static_argnums=2)(cache, groups, 20)
    np.testing.assert_array_equal(np.asarray(staged[:len(ids)], np.float32),
                                  np.asarray(reference.gather_blocks(cache, ids), np.float32))
    new = jnp.asarray(rng.normal(size=staged.shape), jnp.bfloat16)
    want = reference.scatter_blocks(cache, ids, new[:len(ids)])
    out = jax.jit(dispatch.scatter_blocks, donate_argnums=0)(jnp.array(cache), groups, new)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))


# Head layouts whose bfloat16 TPU pool has padding KV heads (`pool_layout`):
# Gemma 3 270M/1B (4 query heads, one KV head of 256) and SmolLM2-135M (9
# query heads, 3 KV heads of 64). (query heads, KV heads, head_dim)
PADDED_HEAD_LAYOUTS = [(4, 1, 256), (9, 3, 64)]


@pytest.mark.parametrize("q_heads,kv_heads,head_dim", PADDED_HEAD_LAYOUTS,
                         ids=[f"q{q}-kv{h}-d{d}" for q, h, d in PADDED_HEAD_LAYOUTS])
def test_padded_kv_head_pool_on_device(q_heads, kv_heads, head_dim):
    """The pool the runtime allocates on this device for these layouts (on TPU
    in bfloat16 with padding heads and head_dim padded to 128 lanes):
    attention told the model's KV heads and the KV update equal the reference
    on the model's own pool."""
    platform, dtype = jax.default_backend(), jnp.bfloat16
    q, cache, meta = make_batch(41, DECODE, group=q_heads // kv_heads, head_dim=head_dim,
                                dtype=dtype, kv_heads=kv_heads)
    heads = jnp.arange(pool_kv_heads(kv_heads, platform, dtype)) % kv_heads
    pool = jnp.take(cache, heads, axis=4)
    pool = jnp.pad(pool, [(0, 0)] * 5 + [(0, pool_head_dim(head_dim, platform) - head_dim)])
    kw = dict(scale=head_dim ** -0.5, sliding_window=9, soft_cap=20.0, num_kv_heads=kv_heads)
    out = jax.jit(lambda q, c, m: dispatch.ragged_paged_attention(q, c, LAYER, m, **kw))(
        q, pool, meta)
    del kw["num_kv_heads"]
    want = reference.ragged_paged_attention(q, cache, LAYER, meta, **kw)
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, np.asarray(want, np.float32), atol=TOLERANCE[dtype],
                               rtol=TOLERANCE[dtype])

    rng = np.random.default_rng(5)
    slots = jnp.asarray([3, 40, cache.shape[0] * 16], jnp.int32)
    k, v = (jnp.asarray(rng.normal(size=(3, kv_heads, head_dim)), dtype) for _ in range(2))
    written = jax.jit(lambda c, k, v, s: dispatch.write_kv(c, LAYER, k, v, s),
                      donate_argnums=0)(jnp.array(pool), k, v, slots)
    got = np.asarray(written, np.float32)[..., :head_dim]
    want = np.asarray(jnp.take(reference.write_kv(cache, LAYER, k, v, slots), heads, axis=4),
                      np.float32)
    np.testing.assert_array_equal(got, want)
