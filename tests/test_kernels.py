"""The Pallas kernels (GPU/Triton and TPU/Mosaic variants) in interpret mode on
CPU against `pallas_kernels.reference`.

Attention batches are built to be awkward: decode rows mixed with prefill
chunks in shuffled order, KV lengths off block boundaries, a sequence of length
1, shuffled non-contiguous pages, padding sequences and padding tokens; every
slot no live sequence owns (other layers included) and every padding query row
is NaN, so any stray read shows up. Tolerances: float32 1e-5; bfloat16 2e-2
(inputs are bf16 and the kernel feeds bf16 probabilities to the PV matmul, as
flash kernels do; the reference keeps them in float32). KV update and block
copies must match exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sluice.pallas_kernels import block_copy, dispatch, ragged_attention, reference
from sluice.pallas_kernels.metadata import AttentionMetadata
from sluice.pallas_kernels.pool_layout import pool_head_dim, pool_kv_heads

NUM_LAYERS, LAYER, BLOCK_SIZE, NUM_KV_HEADS = 2, 1, 16, 2
# (query rows, KV length after this step): decodes, a fresh prefill, chunked
# continuations, a 1-token sequence, a length on a block boundary, a long tail.
MIXED = [(1, 13), (7, 7), (5, 22), (1, 1), (1, 31), (20, 37), (3, 16), (1, 40)]
DECODE = [(1, 13), (1, 1), (1, 33), (1, 16), (1, 7)]
PAD_SEQS, PAD_TOKENS = 2, 3
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def make_batch(seed: int, seqs, *, group: int, head_dim: int, dtype,
               kv_heads: int = NUM_KV_HEADS, block_size: int = BLOCK_SIZE):
    """(q, cache, meta) with NaN wherever no live sequence's data is."""
    rng = np.random.default_rng(seed)
    seqs = [seqs[i] for i in rng.permutation(len(seqs))]
    pages_needed = [-(-kv // block_size) for _, kv in seqs]
    num_seqs, pages = len(seqs) + PAD_SEQS, max(pages_needed) + 1
    num_blocks = sum(pages_needed) + 4
    perm = rng.permutation(num_blocks)
    tables = rng.integers(0, num_blocks, size=(num_seqs, pages))  # unused: arbitrary pages
    cache = np.full((num_blocks, NUM_LAYERS, 2, block_size, kv_heads, head_dim), np.nan,
                    np.float32)
    num_tokens = sum(q for q, _ in seqs) + PAD_TOKENS
    q = np.full((num_tokens, kv_heads * group, head_dim), np.nan, np.float32)
    qsl, used = [0], 0
    for s, ((q_len, kv_len), n) in enumerate(zip(seqs, pages_needed)):
        tables[s, :n] = perm[used:used + n]
        used += n
        for pos in range(kv_len):
            cache[tables[s, pos // block_size], LAYER, :, pos % block_size] = rng.normal(
                size=(2, kv_heads, head_dim))
        q[qsl[-1]:qsl[-1] + q_len] = 3.0 * rng.normal(size=(q_len,) + q.shape[1:])
        qsl.append(qsl[-1] + q_len)
    qsl += [qsl[-1]] * PAD_SEQS
    seq_lens = [kv for _, kv in seqs] + [0] * PAD_SEQS
    meta = AttentionMetadata(
        slot_mapping=jnp.zeros(num_tokens, jnp.int32),  # attention does not read it
        query_start_loc=jnp.asarray(qsl, jnp.int32), seq_lens=jnp.asarray(seq_lens, jnp.int32),
        block_tables=jnp.asarray(tables, jnp.int32), num_seqs=jnp.asarray(len(seqs), jnp.int32),
        max_query_len=max(ql for ql, _ in seqs))
    return jnp.asarray(q, dtype), jnp.asarray(cache, dtype), meta


ATTENTION_CASES = [
    # variant, seqs, group, head_dim, dtype, sliding_window, soft_cap
    ("gpu", MIXED, 1, 64, jnp.float32, None, None),
    ("gpu", MIXED, 4, 128, jnp.bfloat16, 9, 20.0),
    ("gpu", DECODE, 8, 64, jnp.bfloat16, None, 30.0),
    ("tpu", MIXED, 1, 128, jnp.float32, 9, None),
    ("tpu", MIXED, 8, 64, jnp.float32, None, 20.0),
    ("tpu", MIXED, 4, 128, jnp.bfloat16, 9, 20.0),
    ("tpu", DECODE, 4, 128, jnp.bfloat16, None, 30.0),
]


@pytest.mark.parametrize("variant,seqs,group,head_dim,dtype,window,cap", ATTENTION_CASES,
                         ids=[f"{c[0]}-{'mixed' if c[1] is MIXED else 'decode'}-g{c[2]}-d{c[3]}-"
                              f"{jnp.dtype(c[4]).name}-w{c[5]}-cap{c[6]}"
                              for c in ATTENTION_CASES])
def test_ragged_paged_attention(variant, seqs, group, head_dim, dtype, window, cap):
    q, cache, meta = make_batch(group * head_dim, seqs, group=group, head_dim=head_dim,
                                dtype=dtype)
    kw = dict(scale=head_dim ** -0.5, sliding_window=window, soft_cap=cap)
    attend = dispatch.interpreted(variant).attend
    out = jax.jit(lambda q, c, l, m: attend(q, c, l, m, **kw))(q, cache, jnp.int32(LAYER), meta)
    want = reference.ragged_paged_attention(q, cache, LAYER, meta, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    out, want = np.asarray(out, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(out).all()
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(out, want, atol=tol, rtol=tol)
    np.testing.assert_array_equal(out[int(meta.query_start_loc[-1]):], 0.0)  # padding rows


@pytest.mark.parametrize("variant,dtype", [("gpu", jnp.bfloat16), ("tpu", jnp.float32),
                                           ("tpu", jnp.bfloat16)])
def test_write_kv_exact(variant, dtype):
    rng = np.random.default_rng(1)
    num_blocks, head_dim = 6, 64
    cache = np.full((num_blocks, NUM_LAYERS, 2, BLOCK_SIZE, NUM_KV_HEADS, head_dim), np.nan,
                    np.float32)
    num_slots = num_blocks * BLOCK_SIZE
    slots = np.concatenate([rng.choice(num_slots, 9, replace=False),
                            [num_slots, num_slots + 5, 10 * num_slots]])  # padding slots
    k, v = (jnp.asarray(rng.normal(size=(len(slots), NUM_KV_HEADS, head_dim)), dtype)
            for _ in range(2))
    cache, slots = jnp.asarray(cache, dtype), jnp.asarray(slots, jnp.int32)
    write = dispatch.interpreted(variant).write_kv
    out = jax.jit(write)(cache, jnp.int32(LAYER), k, v, slots)
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(reference.write_kv(cache, LAYER, k, v, slots),
                                             np.float32))




# The GPU kernel's KV split (flash-decoding): each sequence's pages cut into
# parts merged by log-sum-exp. Sequences of 1 to 3 pages in 3 or 4 parts leave
# some parts empty, and the window leaves some parts of a row with no key.
SPLIT_CASES = [(DECODE, 3, jnp.float32, 9, 20.0), (DECODE, 4, jnp.bfloat16, None, 30.0),
               (MIXED, 2, jnp.float32, 9, None)]


@pytest.mark.parametrize("seqs,splits,dtype,window,cap", SPLIT_CASES,
                         ids=[f"{'mixed' if c[0] is MIXED else 'decode'}-x{c[1]}-"
                              f"{jnp.dtype(c[2]).name}-w{c[3]}-cap{c[4]}" for c in SPLIT_CASES])
def test_gpu_kv_split_matches_reference(seqs, splits, dtype, window, cap):
    q, cache, meta = make_batch(11, seqs, group=4, head_dim=64, dtype=dtype)
    kw = dict(scale=64 ** -0.5, sliding_window=window, soft_cap=cap)
    attend = dispatch.interpreted("gpu").attend
    out = jax.jit(lambda q, c, m: attend(q, c, LAYER, m, splits=splits, **kw))(q, cache, meta)
    want = reference.ragged_paged_attention(q, cache, LAYER, meta, **kw)
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(out, np.asarray(want, np.float32), atol=tol, rtol=tol)
    np.testing.assert_array_equal(out[int(meta.query_start_loc[-1]):], 0.0)  # padding rows


def test_gpu_kv_split_choice():
    # Llama-3-8B decode of 64 sequences: 16 tiles x 8 KV heads = 128 programs.
    assert ragged_attention.kv_splits(128, 4096, 1) == 3
    assert ragged_attention.kv_splits(8, 32768, 1) == 33  # one sequence, long context
    assert ragged_attention.kv_splits(8, 1024, 1) == 2    # parts walk >= 512 positions
    assert ragged_attention.kv_splits(8, 256, 1) == 1     # too short to split
    assert ragged_attention.kv_splits(512, 32768, 1) == 1  # the grid is full already
    assert ragged_attention.kv_splits(8, 32768, 2048) == 1  # prefill never splits


def test_gpu_kv_split_follows_the_sm_count():
    """The split aims at two waves of the target's SMs, read off the device."""
    assert ragged_attention.kv_splits(128, 4096, 1, sm_count=108) == 2  # an A100
    assert ragged_attention.kv_splits(8, 32768, 1, sm_count=58) == 15   # an L4
    gpu = dataclasses.make_dataclass("FakeGpu", ["platform", "core_count"])
    assert ragged_attention.gpu_sm_count(gpu("gpu", 78)) == 78
    assert ragged_attention.gpu_sm_count(gpu("gpu", None)) == ragged_attention.HOPPER_SMS
    assert ragged_attention.gpu_sm_count(jax.devices("cpu")[0]) == ragged_attention.HOPPER_SMS


def test_gpu_pages_are_cut_to_fit_shared_memory():
    """A page's keys and values that overflow a GPU's shared memory (float32,
    head_dim 256, block 128: 491,776 bytes on sm_90a, 232,448 allowed) are
    attended to in parts that fit, sized for the device's compute capability;
    pages that fit stay whole."""
    f32, bf16 = jnp.float32, jnp.bfloat16
    smem = ragged_attention.HOPPER_SMEM
    parts = ragged_attention.gpu_page_parts(64, 128, 256, f32, smem)
    assert parts > 1
    assert ragged_attention.gpu_smem_bytes(64, 128 // parts, 256, f32) <= smem
    assert ragged_attention.gpu_smem_bytes(64, 2 * 128 // parts, 256, f32) > smem
    assert ragged_attention.gpu_page_parts(16, 128, 128, bf16, smem) == 1
    assert ragged_attention.gpu_page_parts(64, 16, 128, f32, smem) == 1
    a10 = ragged_attention.gpu_page_parts(64, 128, 256, f32, 101_376)
    assert a10 > parts and ragged_attention.gpu_page_parts(64, 16, 256, f32, 1) == 1  # floor
    gpu = dataclasses.make_dataclass("FakeGpu", ["platform", "compute_capability"])
    assert ragged_attention.gpu_shared_memory(gpu("gpu", "9.0")) == smem
    assert ragged_attention.gpu_shared_memory(gpu("gpu", "8.6")) == 101_376
    assert ragged_attention.gpu_shared_memory(gpu("gpu", "7.5")) == min(
        ragged_attention.GPU_SHARED_MEMORY.values())
    assert ragged_attention.gpu_shared_memory(jax.devices("cpu")[0]) == smem


# Sequences spanning several parts of 128-token pages, one ending mid-part.
LONG_PAGES = [(1, 300), (40, 170), (1, 31), (3, 129), (1, 1)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_attention_in_page_parts_matches_reference(dtype):
    """GPU attention with pages cut into parts (head_dim 256, block 128, the
    parts an H100 needs in float32) equals the reference; its parts are KV
    steps of the online softmax, masked as whole pages are."""
    head_dim, block = 256, 128
    q, cache, meta = make_batch(17, LONG_PAGES, group=4, head_dim=head_dim, dtype=dtype,
                                block_size=block)
    kw = dict(scale=head_dim ** -0.5, sliding_window=150, soft_cap=20.0)
    attend = dispatch.interpreted("gpu").attend
    out = jax.jit(lambda q, c, m: attend(q, c, LAYER, m, **kw))(q, cache, meta)
    want = reference.ragged_paged_attention(q, cache, LAYER, meta, **kw)
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(out, np.asarray(want, np.float32), atol=tol, rtol=tol)
    np.testing.assert_array_equal(out[int(meta.query_start_loc[-1]):], 0.0)


def _pallas_grids(fn, *args) -> list[tuple]:
    jaxpr = jax.make_jaxpr(fn)(*args)
    return [tuple(e.params["grid_mapping"].grid) for e in jaxpr.eqns
            if e.primitive.name == "pallas_call"]


def test_gpu_attention_is_sized_for_the_given_device():
    """The KV split follows the SMs of the device the kernel is sized for, not
    the default device's (a decode in 2 tiles x 2 KV heads: 5 parts for 132 SMs,
    2 for 4)."""
    gpu = dataclasses.make_dataclass("FakeGpu", ["platform", "core_count", "compute_capability"])
    q, cache, meta = make_batch(8, [(1, 3000), (1, 1200)], group=4, head_dim=64,
                                dtype=jnp.float32)
    attend = functools.partial(ragged_attention.ragged_paged_attention_gpu, scale=0.125,
                               interpret=True)
    grids = {sms: _pallas_grids(lambda q, c, m: attend(q, c, LAYER, m, device=gpu(
        "gpu", sms, "9.0")), q, cache, meta) for sms in (132, 4)}
    assert grids == {132: [(2, NUM_KV_HEADS, 5)], 4: [(2, NUM_KV_HEADS, 2)]}


def _exported_warps(seqs, block: int) -> set[int]:
    """``num_warps`` of every Triton call in GPU attention exported for cuda
    (Llama-3 heads: 4 query heads per KV head) at ``seqs`` (query rows, KV length)."""
    q_heads, kv_heads, head_dim = 32, 8, 128
    pages = max(-(-kv // block) for _, kv in seqs)
    tokens = sum(q for q, _ in seqs)
    sds = jax.ShapeDtypeStruct
    meta = AttentionMetadata(sds((tokens,), jnp.int32), sds((len(seqs) + 1,), jnp.int32),
                             sds((len(seqs),), jnp.int32), sds((len(seqs), pages), jnp.int32),
                             sds((), jnp.int32), max_query_len=max(q for q, _ in seqs))
    args = (sds((tokens, q_heads, head_dim), jnp.bfloat16),
            sds((len(seqs) * pages + 1, 1, 2, block, kv_heads, head_dim), jnp.bfloat16), meta)
    from jax import export
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    kind, device_platform = EXPORT_CHIPS["cuda"]
    with use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
            kind, 1, device_platform))):
        module = export.export(
            jax.jit(lambda q, c, m: dispatch.ragged_paged_attention(q, c, 0, m, scale=0.1)),
            platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call(
                KERNEL_CALLS["cuda"])])(*args).mlir_module()
    assert f"@{KERNEL_CALLS['cuda']}(" in module
    return {int(n) for n in re.findall(r"num_warps = (\d+)", module)}


def test_gpu_prefill_launches_8_warps():
    """The 8-warp rule (`ragged_attention._gpu_warps`) reaches the Triton launch:
    a prefill tile (64 rows) at block size 128 with 4 warps needs 255 registers
    and spills on sm_90a (ptxas), with 8 none; decodes at block 16 keep 4."""
    assert _exported_warps([(64, 256), (64, 64)], 128) == {8}
    assert _exported_warps([(1, 100), (1, 40)], 16) == {4}


# A pool whose head dimension is padded past the model's (the TPU pool for
# head_dim 64 / 96, `pool_layout.pool_head_dim`): every path takes q/k/v at the
# model's head_dim and gives what the unpadded pool gives.
PADDED_CASES = [("tpu", MIXED, jnp.float32), ("tpu", DECODE, jnp.bfloat16),
                ("cpu", MIXED, jnp.bfloat16)]


def _padded(cache: jax.Array, size: int) -> jax.Array:
    return jnp.pad(cache, [(0, 0)] * 5 + [(0, size - cache.shape[-1])])


@pytest.mark.parametrize("path,seqs,dtype", PADDED_CASES,
                         ids=[f"{p}-{'mixed' if s is MIXED else 'decode'}-{jnp.dtype(d).name}"
                              for p, s, d in PADDED_CASES])
def test_padded_pool_gives_the_unpadded_results(path, seqs, dtype):
    head_dim, group = 96, 2
    pool_dim = pool_head_dim(head_dim, "tpu")
    assert pool_dim == 128 and pool_head_dim(head_dim, "cpu") == head_dim
    q, cache, meta = make_batch(7, seqs, group=group, head_dim=head_dim, dtype=dtype)
    ops = dispatch.interpreted("tpu") if path == "tpu" else dispatch  # dispatch on CPU: chunked
    kw = dict(scale=head_dim ** -0.5, sliding_window=9, soft_cap=20.0)
    out = jax.jit(lambda q, c, m: ops.ragged_paged_attention(q, c, LAYER, m, **kw)
                  if ops is dispatch else ops.attend(q, c, LAYER, m, **kw))(
        q, _padded(cache, pool_dim), meta)
    want = reference.ragged_paged_attention(q, cache, LAYER, meta, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32),
                               atol=tol, rtol=tol)

    rng = np.random.default_rng(3)
    slots = jnp.asarray([5, 17, 3 * BLOCK_SIZE + 1, cache.shape[0] * BLOCK_SIZE], jnp.int32)
    k, v = (jnp.asarray(rng.normal(size=(4, NUM_KV_HEADS, head_dim)), dtype) for _ in range(2))
    write = ops.write_kv
    written = jax.jit(write)(_padded(cache, pool_dim), jnp.int32(LAYER), k, v, slots)
    np.testing.assert_array_equal(
        np.asarray(written, np.float32),
        np.asarray(_padded(reference.write_kv(cache, LAYER, k, v, slots), pool_dim), np.float32))


# A pool with padding KV heads (the bfloat16 TPU pool of a model whose KV-head
# count XLA would re-lay out, `pool_layout.pool_kv_heads`): SmolLM2-135M's 3
# heads (9 query heads) in 4, 3 heads of 4 query heads each (12 query heads:
# as many as 4 groups of 3 would be, only num_kv_heads tells them apart) and
# Gemma 3's one head (4 query heads) in 2. Every path, told the model's count,
# gives what the model's pool gives; the padding heads are NaN, so a read of
# one shows. Writes fill the padding heads with copies of the model's heads.
PADDED_HEAD_CASES = [("tpu", MIXED, 3, 3, jnp.bfloat16), ("tpu", MIXED, 3, 3, jnp.float32),
                     ("tpu", DECODE, 3, 4, jnp.bfloat16), ("tpu", DECODE, 1, 4, jnp.bfloat16),
                     ("gpu", MIXED, 3, 3, jnp.float32), ("gpu", DECODE, 1, 4, jnp.bfloat16),
                     ("cpu", MIXED, 3, 4, jnp.bfloat16), ("reference", DECODE, 3, 3, jnp.float32)]


def test_pool_kv_heads_pads_only_where_tpu_relays_out():
    """Counts XLA re-lays out in a bfloat16 TPU pool (1, 3, 6, 12 probed on v5e)
    go to the smallest count it keeps row-major; nothing else changes."""
    want = {1: 2, 3: 4, 5: 8, 6: 8, 7: 8, 9: 16, 12: 16, 20: 24}
    assert {h: pool_kv_heads(h, "tpu", jnp.bfloat16) for h in want} == want
    for heads in (2, 4, 8, 16, 24, 32, 40):  # kept row-major by XLA
        assert pool_kv_heads(heads, "tpu", jnp.bfloat16) == heads
    for heads in (1, 3, 12):
        assert pool_kv_heads(heads, "tpu", jnp.float32) == heads
        assert pool_kv_heads(heads, "cpu", jnp.bfloat16) == heads
        assert pool_kv_heads(heads, "cuda", jnp.bfloat16) == heads
    with pytest.raises(ValueError, match="num_kv_heads"):
        pool_kv_heads(0, "tpu", jnp.bfloat16)


def _path_ops(path: str):
    """(attend, write_kv) of a test path: a variant's kernels interpreted,
    dispatch on CPU (chunked attention) or the reference."""
    if path in ("tpu", "gpu"):
        ops = dispatch.interpreted(path)
        return ops.attend, ops.write_kv
    if path == "cpu":
        return dispatch.ragged_paged_attention, dispatch.write_kv
    return reference.ragged_paged_attention, reference.write_kv


@pytest.mark.parametrize("path,seqs,heads,group,dtype", PADDED_HEAD_CASES,
                         ids=[f"{p}-{'mixed' if s is MIXED else 'decode'}-h{h}-g{g}-"
                              f"{jnp.dtype(d).name}" for p, s, h, g, d in PADDED_HEAD_CASES])
def test_padded_kv_heads_give_the_model_pool_results(path, seqs, heads, group, dtype):
    head_dim = 128
    pool_heads = pool_kv_heads(heads, "tpu", jnp.bfloat16)
    assert pool_heads > heads
    q, cache, meta = make_batch(5, seqs, group=group, head_dim=head_dim, dtype=dtype,
                                kv_heads=heads)
    pool = jnp.pad(cache, [(0, 0)] * 4 + [(0, pool_heads - heads), (0, 0)],
                   constant_values=np.nan)
    attend, write_kv = _path_ops(path)
    kw = dict(scale=head_dim ** -0.5, sliding_window=9, soft_cap=20.0)
    out = jax.jit(lambda q, c, m: attend(q, c, LAYER, m, num_kv_heads=heads, **kw))(
        q, pool, meta)
    want = reference.ragged_paged_attention(q, cache, LAYER, meta, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(out, np.asarray(want, np.float32), atol=tol, rtol=tol)

    rng = np.random.default_rng(4)
    slots = jnp.asarray([5, 17, 3 * BLOCK_SIZE + 1, cache.shape[0] * BLOCK_SIZE], jnp.int32)
    k, v = (jnp.asarray(rng.normal(size=(4, heads, head_dim)), dtype) for _ in range(2))
    model_pool = jnp.nan_to_num(cache)
    padded = jnp.take(model_pool, jnp.arange(pool_heads) % heads, axis=4)
    written = jax.jit(write_kv)(padded, jnp.int32(LAYER), k, v, slots)
    want = reference.write_kv(model_pool, LAYER, k, v, slots)
    np.testing.assert_array_equal(
        np.asarray(written, np.float32),
        np.asarray(jnp.take(want, jnp.arange(pool_heads) % heads, axis=4), np.float32))


def test_kv_head_count_errors_name_the_field():
    """A KV-head count the pool cannot hold, or query heads that do not divide
    among it, is a ValueError naming the field, on every path."""
    q, cache, meta = make_batch(6, DECODE, group=3, head_dim=64, dtype=jnp.float32, kv_heads=3)
    pool = jnp.pad(cache, [(0, 0)] * 4 + [(0, 1), (0, 0)])
    for path in ("tpu", "gpu", "cpu", "reference"):
        attend, write_kv = _path_ops(path)
        with pytest.raises(ValueError, match="num_heads: 9 query heads"):  # 9 over 4 pool heads
            attend(q, pool, LAYER, meta, scale=0.125)
        with pytest.raises(ValueError, match="num_kv_heads: 5 KV heads"):
            attend(q, pool, LAYER, meta, scale=0.125, num_kv_heads=5)
        k = jnp.zeros((2, 5, 64), jnp.float32)
        with pytest.raises(ValueError, match="num_kv_heads: 5 KV heads"):
            write_kv(pool, LAYER, k, k, jnp.zeros(2, jnp.int32))


# Runs of every kind: length 1, a power of two (one DMA), 3 and 7 (several DMAs).
GROUPS = [(9, 3), (2, 1), (12, 4), (0, 2), (17, 7)]


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
def test_block_gather_scatter_exact(variant):
    rng = np.random.default_rng(2)
    shape = (24, NUM_LAYERS, 2, BLOCK_SIZE, NUM_KV_HEADS, 64)
    cache = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
    ids = block_copy.expand_groups(GROUPS)
    groups = block_copy.groups_array(GROUPS, max_groups=8)
    num_staged = 20  # capacity beyond the 17 staged blocks
    ops = dispatch.interpreted(variant)

    staged = jax.jit(ops.gather, static_argnums=2)(cache, groups, num_staged)
    assert staged.shape == (num_staged,) + shape[1:]
    np.testing.assert_array_equal(np.asarray(staged[:len(ids)], np.float32),
                                  np.asarray(reference.gather_blocks(cache, ids), np.float32))

    new = jnp.asarray(rng.normal(size=staged.shape), jnp.bfloat16)
    out = jax.jit(ops.scatter)(cache, groups, new)
    want = reference.scatter_blocks(cache, ids, new[:len(ids)])
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))


def test_tpu_kernels_stay_in_bounds():
    """Metadata pointing outside the tables or the pool must not make a TPU
    kernel DMA out of bounds (the TPU interpreter faults on such a DMA; real
    hardware would read or corrupt other memory): attention with a page index
    past the pool, a sequence longer than its table row and num_seqs past the
    table; write_kv with negative slots; block copies with runs past the pool and
    past the staging buffer. Sequences with sound metadata keep their results
    (the pool is finite here: a corrupt sequence reads whatever its clamped pages
    hold, and NaN there would reach rows sharing its tile through the PV matmul)."""
    ops = dispatch.interpreted("tpu")
    q, cache, meta = make_batch(5, DECODE[:3], group=1, head_dim=64, dtype=jnp.float32)
    cache = jnp.nan_to_num(cache)
    num_blocks, pages = cache.shape[0], meta.block_tables.shape[1]
    bad = dataclasses.replace(
        meta, block_tables=meta.block_tables.at[0, 0].set(num_blocks + 100),
        seq_lens=meta.seq_lens.at[1].set(pages * BLOCK_SIZE + 40),
        num_seqs=meta.num_seqs + PAD_SEQS + 5)
    out = jax.jit(lambda q, c, m: ops.attend(q, c, LAYER, m, scale=0.125))(q, cache, bad)
    want = reference.ragged_paged_attention(q, cache, LAYER, meta, scale=0.125)
    sound = slice(int(meta.query_start_loc[2]), int(meta.query_start_loc[-1]))
    np.testing.assert_allclose(np.asarray(out[sound]), np.asarray(want[sound]), atol=1e-5)

    slots = jnp.asarray([-1, -BLOCK_SIZE - 3, 5, num_blocks * BLOCK_SIZE], jnp.int32)
    k = jnp.ones((4, NUM_KV_HEADS, 64), jnp.float32)
    empty = jnp.zeros_like(cache)
    written = jax.jit(ops.write_kv)(empty, LAYER, k, k, slots)
    np.testing.assert_array_equal(np.asarray(written), np.asarray(
        reference.write_kv(empty, LAYER, k[:1], k[:1], slots[2:3])))

    pool = jnp.broadcast_to(jnp.arange(num_blocks, dtype=jnp.float32).reshape(-1, 1, 1, 1, 1, 1),
                            cache.shape)
    # The second run is trimmed at the pool's end; the third starts past the
    # 8-row staging buffer (runs keep the staging offsets of list order).
    runs = [(1, 2), (num_blocks - 2, 9), (0, 30)]
    groups = block_copy.groups_array(runs, max_groups=4)
    moved = [1, 2, num_blocks - 2, num_blocks - 1]
    staged = jax.jit(ops.gather, static_argnums=2)(pool, groups, 8)
    np.testing.assert_array_equal(np.asarray(staged[:4, 0, 0, 0, 0, 0]), moved)
    scattered = jax.jit(ops.scatter)(pool, groups, -jnp.ones_like(staged))
    np.testing.assert_array_equal(np.asarray(scattered[:, 0, 0, 0, 0, 0]),
                                  [-1 if b in moved else b for b in range(num_blocks)])


def test_tpu_attention_refuses_tables_past_smem():
    """A block table too large for the TPU kernel's SMEM is a ValueError naming
    it when traced (the compiler would fail with an SMEM allocation error)."""
    from sluice.pallas_kernels import ragged_attention

    seqs, pages = 64, 4096
    i32 = jnp.int32
    meta = AttentionMetadata(
        jax.ShapeDtypeStruct((seqs,), i32), jax.ShapeDtypeStruct((seqs + 1,), i32),
        jax.ShapeDtypeStruct((seqs,), i32), jax.ShapeDtypeStruct((seqs, pages), i32),
        jax.ShapeDtypeStruct((), i32), 1)
    q = jax.ShapeDtypeStruct((seqs, 8, 128), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((4096, 1, 2, 16, 2, 128), jnp.bfloat16)
    attend = ragged_attention.ragged_paged_attention_tpu
    with pytest.raises(ValueError, match="block_tables"):
        jax.eval_shape(lambda q, c, m: attend(q, c, 0, m, scale=0.1), q, cache, meta)
    small = dataclasses.replace(meta, block_tables=jax.ShapeDtypeStruct((seqs, 64), i32))
    assert jax.eval_shape(lambda q, c, m: attend(q, c, 0, m, scale=0.1), q, cache,
                          small).shape == q.shape


# Kernel custom call each lowering platform must contain (CPU: none, pure JAX),
# and the chip an export with no device names for Pallas (jax.sharding.AbstractDevice).
KERNEL_CALLS = {"cpu": None, "cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
EXPORT_CHIPS = {"cuda": ("NVIDIA H100 80GB HBM3", "gpu"), "tpu": ("TPU v6 lite", "tpu")}


@pytest.mark.parametrize("platform", sorted(KERNEL_CALLS))
def test_dispatch_follows_the_lowering_platform(platform):
    """Every entry point lowered for a platform from this CPU host (the way an
    export or AOT compile is) contains that platform's kernel, not the CPU path
    `jax.default_backend()` would pick; lowering only (the compile tier in
    compile_tests/ compiles for real targets)."""
    import contextlib

    from jax import export
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    q, cache, meta = make_batch(0, MIXED, group=4, head_dim=64, dtype=jnp.bfloat16)
    k = jnp.zeros((q.shape[0], NUM_KV_HEADS, 64), jnp.bfloat16)
    groups = block_copy.groups_array(GROUPS, 8)
    calls = [
        (lambda q, c, m: dispatch.ragged_paged_attention(q, c, 1, m, scale=0.125,
                                                         sliding_window=8, soft_cap=30.0),
         (q, cache, meta)),
        (lambda c, k, s: dispatch.write_kv(c, 1, k, k, s), (cache, k, meta.slot_mapping)),
        (lambda c, g: dispatch.gather_blocks(c, g, 20), (cache, groups)),
        (dispatch.scatter_blocks, (cache, groups, cache[:20])),
    ]
    chip = contextlib.nullcontext()
    if platform in EXPORT_CHIPS:
        kind, device_platform = EXPORT_CHIPS[platform]
        chip = use_abstract_mesh(AbstractMesh(
            (1,), ("x",), abstract_device=AbstractDevice(kind, 1, device_platform)))
    unchecked = [export.DisabledSafetyCheck.custom_call(c) for c in KERNEL_CALLS.values() if c]
    for fn, args in calls:
        with chip:
            module = export.export(jax.jit(fn), platforms=[platform],
                                   disabled_checks=unchecked)(*args).mlir_module()
        for other, target in KERNEL_CALLS.items():
            if target is not None:
                assert (f"@{target}(" in module) == (other == platform), (platform, target)


@pytest.mark.parametrize("head_dim", [96, 80])
def test_write_kv_gpu_any_head_dim(head_dim):
    """The Triton KV update writes rows of kv_heads * head_dim in power-of-two
    pieces (2 x 96 = 128 + 64, 2 x 80 = 128 + 32), exactly, skipping padding and
    negative slots."""
    from sluice.pallas_kernels.kv_update import row_pieces

    assert row_pieces(NUM_KV_HEADS * head_dim) == [(0, 128), (128, NUM_KV_HEADS * head_dim - 128)]
    rng = np.random.default_rng(head_dim)
    cache = jnp.asarray(rng.normal(size=(5, NUM_LAYERS, 2, BLOCK_SIZE, NUM_KV_HEADS, head_dim)),
                        jnp.bfloat16)
    num_slots = 5 * BLOCK_SIZE
    slots = np.concatenate([rng.choice(num_slots, 7, replace=False), [num_slots, -1]])
    k, v = (jnp.asarray(rng.normal(size=(len(slots), NUM_KV_HEADS, head_dim)), jnp.float32)
            for _ in range(2))
    out = jax.jit(dispatch.interpreted("gpu").write_kv)(cache, jnp.int32(LAYER), k, v,
                                                       jnp.asarray(slots, jnp.int32))
    live = slots[:-1]  # the reference wraps negative indices; the kernel skips them
    want = reference.write_kv(cache, LAYER, k[:-1], v[:-1], jnp.asarray(live, jnp.int32))
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))


def test_gpu_block_copies_stay_in_the_pool():
    """Runs past the pool's end move only the blocks inside it; without the
    guard the interpreted scatter clamps the extra rows onto the last block."""
    ops = dispatch.interpreted("gpu")
    num_blocks = 6
    shape = (num_blocks, NUM_LAYERS, 2, BLOCK_SIZE, NUM_KV_HEADS, 64)
    pool = jnp.broadcast_to(jnp.arange(num_blocks, dtype=jnp.float32).reshape(-1, 1, 1, 1, 1, 1),
                            shape)
    groups = block_copy.groups_array([(1, 2), (num_blocks - 2, 9)], max_groups=4)
    staging = jnp.broadcast_to(100 + jnp.arange(16, dtype=jnp.float32).reshape(-1, 1, 1, 1, 1, 1),
                               (16,) + shape[1:])
    out = jax.jit(ops.scatter)(pool, groups, staging)
    np.testing.assert_array_equal(np.asarray(out[:, 0, 0, 0, 0, 0]), [0, 100, 101, 3, 102, 103])
    staged = jax.jit(ops.gather, static_argnums=2)(pool, groups, 16)
    np.testing.assert_array_equal(np.asarray(staged[:4, 0, 0, 0, 0, 0]), [1, 2, 4, 5])


def test_engine_greedy_matches_reference():
    from sluice.runtime import LLM, SamplingParams

    prompts = ["The quick brown fox", "a", "Sluice serves ragged batches of many lengths"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def run(backend: str) -> list[list[int]]:
        llm = LLM("tiny", attention_backend=backend, warmup=False, max_model_len=128,
                  max_num_seqs=4, max_num_batched_tokens=32, kv_cache_memory=1 << 20)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    assert run("pallas-interpret") == run("reference")
