"""Every kernel entry point compiled for each target at realistic shapes.

Head layouts (query heads, KV heads, head_dim, layers): Llama-3-8B, Qwen2-0.5B
(7 query heads per KV head: the group pads to 8), Gemma 3 4B (head_dim 256),
Gemma 3 1B (one KV head, as in 270M: 4 query heads x 256) and Phi-3-mini
(head_dim 96, no grouping), so head dims 64, 96, 128 and 256 all compile.
Batches: decode of 1 and of 64 sequences at 4k tokens, a prefill
of 8 x 2048 tokens, and a ragged mixed batch (30 decodes, a 512-token chunk
continuing a prompt, a fresh prompt) with a sliding window and a soft cap.
Block sizes 16 to 128 rotate through the cases (each model and each batch
meets every block size); bfloat16 everywhere, float32 once per model, and
head_dim 256 prefill at block size 128 in bfloat16 (GPU shared memory). A
SmolLM2-135M case (3 KV heads of 64) checks its padded TPU pool.

Each test compiles through `sluice.pallas_kernels.dispatch` (what the engine
calls) and asserts that the compiled module holds the target's kernel custom
call, so it fails if dispatch picks the CPU path (except GPU attention at
head_dim 96, which is documented to take the pure-JAX path: Triton needs
power-of-two blocks); kernels that update the pool are compiled with it
donated and must alias it, never copy it. Pools are the ones the runtime
allocates for the target (`pool_layout.pool_head_dim`): on TPU, head dims 64
and 96 are padded to 128 lanes, and a bfloat16 pool with one KV head has a
padding head (`pool_layout.pool_kv_heads`), without which XLA gave the pool a
layout other than the kernels' row-major one and copied it whole around every
call.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import pytest

from compile_tests.check import (PoolCopied, assert_kernels, assert_pool_in_place,
                                 assert_pool_not_copied, compile_for, kernel_calls, record, sds)
from compile_tests.targets import device
from sluice.pallas_kernels import dispatch
from sluice.pallas_kernels.metadata import AttentionMetadata
from sluice.pallas_kernels.pool_layout import pool_head_dim, pool_kv_heads
from sluice.pallas_kernels.ragged_attention import gpu_sm_count, kv_splits, triton_shapes

MODELS = {  # name: (query heads, KV heads, head_dim, layers)
    "llama3-8b": (32, 8, 128, 32),
    "qwen2-0.5b": (14, 2, 64, 24),
    "gemma3-4b": (8, 4, 256, 34),
    "gemma3-1b": (4, 1, 256, 26),
    "phi3-mini": (32, 32, 96, 32),
}
BLOCK_SIZES = (16, 32, 64, 128)
# name: (sequences, tokens, max query rows, KV tokens per sequence, window, soft cap)
BATCHES = {
    "decode1": (1, 1, 1, 4096, None, None),
    "decode64": (64, 64, 1, 4096, None, None),
    "prefill8x2048": (8, 8 * 2048, 2048, 2048, None, None),
    "mixed-window-cap": (32, 1024, 512, 4096, 1024, 50.0),
}
# Pool layers for kernels that index one layer (the kernel does not depend on it).
KERNEL_POOL_LAYERS = 2


def _latin(i: int, j: int) -> int:
    return BLOCK_SIZES[(i + j) % len(BLOCK_SIZES)]


ATTENTION_CASES = [(model, batch, _latin(i, j), "bfloat16")
                   for (i, model), (j, batch) in itertools.product(enumerate(MODELS),
                                                                   enumerate(BATCHES))]
ATTENTION_CASES += [(model, list(BATCHES)[i % len(BATCHES)], _latin(i, i + 1), "float32")
                    for i, model in enumerate(MODELS)]
# Whole pages of head_dim 256 overflow an H100's shared memory (232,448 bytes)
# at block size 128 with prefill tiles: 491,776 bytes in float32 (gemma3-1b's
# float32 case above), 294,912 in bfloat16; the GPU kernel attends to such
# pages in parts (`ragged_attention.gpu_page_parts`).
ATTENTION_CASES += [("gemma3-4b", "prefill8x2048", 128, "bfloat16")]


def _pool(target, model: str, block: int, num_blocks: int, layers: int, dtype):
    """The pool the runtime allocates on ``target`` (`pool_head_dim` and
    `pool_kv_heads` pad where the target's kernels need it)."""
    _, kv_heads, head_dim, _ = MODELS[model]
    return sds(target, (num_blocks, layers, 2, block,
                        pool_kv_heads(kv_heads, target.platform, dtype),
                        pool_head_dim(head_dim, target.platform)), dtype)


@pytest.mark.parametrize("model,batch,block,dtype", ATTENTION_CASES,
                         ids=[f"{m}-{b}-bs{s}-{d}" for m, b, s, d in ATTENTION_CASES])
def test_attention_compiles(target, model, batch, block, dtype):
    q_heads, _, head_dim, _ = MODELS[model]
    seqs, tokens, max_q, kv_len, window, cap = BATCHES[batch]
    pages = -(-kv_len // block)
    cache = _pool(target, model, block, seqs * pages + 1, KERNEL_POOL_LAYERS, dtype)
    meta = AttentionMetadata(
        sds(target, (tokens,), jnp.int32), sds(target, (seqs + 1,), jnp.int32),
        sds(target, (seqs,), jnp.int32), sds(target, (seqs, pages), jnp.int32),
        sds(target, (), jnp.int32), max_query_len=max_q)
    q = sds(target, (tokens, q_heads, head_dim), dtype)

    def attend(q, cache, layer, meta):
        return dispatch.ragged_paged_attention(q, cache, layer, meta, scale=head_dim ** -0.5,
                                               sliding_window=window, soft_cap=cap)

    args = (q, cache, sds(target, (), jnp.int32), meta)
    compiled, hlo, seconds = compile_for(target, attend, args)
    if target.platform == "gpu" and not triton_shapes(head_dim, block):
        # The documented fallback: Triton needs power-of-two blocks.
        assert kernel_calls(hlo, target) == 0
    else:
        assert_kernels(hlo, target)
    # Read-only, but a layout change of the operand would copy the whole pool per call.
    assert_pool_not_copied(hlo, cache.shape)
    record(target, compiled, seconds, kernel="attention", model=model, batch=batch,
           block=block, dtype=dtype)


WRITE_CASES = [(model, tokens, _latin(i, j), dtype)
               for i, model in enumerate(MODELS)
               for j, (tokens, dtype) in enumerate([(64, "bfloat16"), (2048, "float32")])]


@pytest.mark.parametrize("model,tokens,block,dtype", WRITE_CASES,
                         ids=[f"{m}-t{t}-bs{b}-{d}" for m, t, b, d in WRITE_CASES])
def test_write_kv_compiles_in_place(target, model, tokens, block, dtype):
    _, kv_heads, head_dim, _ = MODELS[model]
    cache = _pool(target, model, block, 4096 * 16 // block, KERNEL_POOL_LAYERS, dtype)
    new = sds(target, (tokens, kv_heads, head_dim), dtype)

    def write(cache, layer, k, v, slots):
        return dispatch.write_kv(cache, layer, k, v, slots)

    compiled, hlo, seconds = compile_for(
        target, write, (cache, sds(target, (), jnp.int32), new, new,
                        sds(target, (tokens,), jnp.int32)), donate=(0,))
    assert_kernels(hlo, target)
    assert_pool_in_place(hlo, 0, cache.shape)
    record(target, compiled, seconds, kernel="write_kv", model=model, tokens=tokens,
           block=block, dtype=dtype)


# Swap and migration copies: 8 runs into a 32-block staging buffer (the live
# migration chunk), whole blocks of every layer.
COPY_CASES = [(model, _latin(i, 1)) for i, model in enumerate(MODELS)]
COPY_RUNS, COPY_STAGED, COPY_POOL_BLOCKS = 8, 32, 96


@pytest.mark.parametrize("model,block", COPY_CASES, ids=[f"{m}-bs{b}" for m, b in COPY_CASES])
def test_block_copies_compile(target, model, block):
    layers = MODELS[model][3]
    cache = _pool(target, model, block, COPY_POOL_BLOCKS, layers, "bfloat16")
    groups = sds(target, (COPY_RUNS, 2), jnp.int32)

    compiled, hlo, seconds = compile_for(
        target, lambda c, g: dispatch.gather_blocks(c, g, COPY_STAGED), (cache, groups))
    assert_kernels(hlo, target)
    record(target, compiled, seconds, kernel="gather_blocks", model=model, block=block,
           dtype="bfloat16")

    staging = sds(target, (COPY_STAGED,) + cache.shape[1:], "bfloat16")
    compiled, hlo, seconds = compile_for(target, dispatch.scatter_blocks,
                                         (cache, groups, staging), donate=(0,))
    assert_kernels(hlo, target)
    assert_pool_in_place(hlo, 0, cache.shape)
    record(target, compiled, seconds, kernel="scatter_blocks", model=model, block=block,
           dtype="bfloat16")


# A few long decodes (4 sequences of 32k tokens, with a window and a soft cap)
# at the smallest and largest block size. On GPU the 4 rows are one tile, 8
# programs for 8 KV heads, so flash-decoding's KV split cuts every sequence
# into parts, one program each, merged in XLA: the kernel must write per-part
# float32 outputs.
SPLIT_BLOCKS = (16, 128)


@pytest.mark.parametrize("block", SPLIT_BLOCKS, ids=[f"bs{b}" for b in SPLIT_BLOCKS])
def test_long_decode_compiles(target, block):
    q_heads, kv_heads, head_dim, _ = MODELS["llama3-8b"]
    seqs, kv_len = 4, 32768
    pages = kv_len // block
    cache = _pool(target, "llama3-8b", block, seqs * pages + 1, KERNEL_POOL_LAYERS, "bfloat16")
    meta = AttentionMetadata(
        sds(target, (seqs,), jnp.int32), sds(target, (seqs + 1,), jnp.int32),
        sds(target, (seqs,), jnp.int32), sds(target, (seqs, pages), jnp.int32),
        sds(target, (), jnp.int32), max_query_len=1)
    q = sds(target, (seqs, q_heads, head_dim), "bfloat16")
    # GPU: one tile x 8 KV heads on the target's SMs (its GpuTargetConfig's core_count).
    splits = kv_splits(kv_heads, kv_len, 1, gpu_sm_count(device(target)))

    def attend(q, cache, layer, meta):
        return dispatch.ragged_paged_attention(q, cache, layer, meta, scale=head_dim ** -0.5,
                                               sliding_window=8192, soft_cap=30.0)

    compiled, hlo, seconds = compile_for(target, attend,
                                         (q, cache, sds(target, (), jnp.int32), meta))
    assert_kernels(hlo, target)
    if target.platform == "gpu":
        assert splits > 1 and f"f32[{splits},{kv_heads}," in hlo, "no per-part outputs: no split"
    assert_pool_not_copied(hlo, cache.shape)
    record(target, compiled, seconds, kernel="attention_split", model="llama3-8b",
           batch=f"decode{seqs}x{kv_len}", block=block, dtype="bfloat16",
           splits=splits if target.platform == "gpu" else 1)


# SmolLM2-135M's head layout: 9 query heads over 3 KV heads of 64. In bfloat16
# XLA re-lays out a TPU pool of 3 KV heads and copies it whole around every KV
# write; the pool the runtime allocates has 4 (`pool_layout.pool_kv_heads`, one
# padding head) and is written in place and read without a copy. The probe is
# kept honest: on TPU the model's own 3-head pool must still show the copy.
SMOLLM2_HEADS = (9, 3, 64)  # query heads, KV heads, head_dim
SMOLLM2_BLOCK = 32


def test_padded_kv_heads_compile_in_place(target):
    q_heads, kv_heads, head_dim = SMOLLM2_HEADS
    dtype, tokens, num_blocks = "bfloat16", 64, 4096 * 16 // SMOLLM2_BLOCK
    pool_heads = pool_kv_heads(kv_heads, target.platform, dtype)
    assert pool_heads == (4 if target.platform == "tpu" else kv_heads)
    new = sds(target, (tokens, kv_heads, head_dim), dtype)

    def compile_write(heads: int) -> tuple:
        cache = sds(target, (num_blocks, KERNEL_POOL_LAYERS, 2, SMOLLM2_BLOCK, heads,
                             pool_head_dim(head_dim, target.platform)), dtype)
        compiled, hlo, seconds = compile_for(
            target, dispatch.write_kv, (cache, sds(target, (), jnp.int32), new, new,
                                        sds(target, (tokens,), jnp.int32)), donate=(0,))
        assert_kernels(hlo, target)
        return cache, compiled, hlo, seconds

    if target.platform == "tpu":  # before: the model's own head count is copied
        cache, _, hlo, _ = compile_write(kv_heads)
        with pytest.raises(PoolCopied):
            assert_pool_not_copied(hlo, cache.shape)
    cache, compiled, hlo, seconds = compile_write(pool_heads)
    assert_pool_in_place(hlo, 0, cache.shape)
    record(target, compiled, seconds, kernel="write_kv", model="smollm2-135m", tokens=tokens,
           block=SMOLLM2_BLOCK, dtype=dtype)

    for batch in ("decode64", "mixed-window-cap"):
        seqs, tokens, max_q, kv_len, window, cap = BATCHES[batch]
        pages = -(-kv_len // SMOLLM2_BLOCK)
        pool = sds(target, (seqs * pages + 1,) + cache.shape[1:], dtype)
        meta = AttentionMetadata(
            sds(target, (tokens,), jnp.int32), sds(target, (seqs + 1,), jnp.int32),
            sds(target, (seqs,), jnp.int32), sds(target, (seqs, pages), jnp.int32),
            sds(target, (), jnp.int32), max_query_len=max_q)

        def attend(q, cache, layer, meta):
            return dispatch.ragged_paged_attention(q, cache, layer, meta, scale=head_dim ** -0.5,
                                                   sliding_window=window, soft_cap=cap,
                                                   num_kv_heads=kv_heads)

        compiled, hlo, seconds = compile_for(
            target, attend, (sds(target, (tokens, q_heads, head_dim), dtype), pool,
                             sds(target, (), jnp.int32), meta))
        assert_kernels(hlo, target)
        assert_pool_not_copied(hlo, pool.shape)
        record(target, compiled, seconds, kernel="attention", model="smollm2-135m", batch=batch,
               block=SMOLLM2_BLOCK, dtype=dtype)
