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

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sluice.pallas_kernels import block_copy, dispatch, reference
from sluice.pallas_kernels.metadata import AttentionMetadata

NUM_LAYERS, LAYER, BLOCK_SIZE, NUM_KV_HEADS = 2, 1, 16, 2
# (query rows, KV length after this step): decodes, a fresh prefill, chunked
# continuations, a 1-token sequence, a length on a block boundary, a long tail.
MIXED = [(1, 13), (7, 7), (5, 22), (1, 1), (1, 31), (20, 37), (3, 16), (1, 40)]
DECODE = [(1, 13), (1, 1), (1, 33), (1, 16), (1, 7)]
PAD_SEQS, PAD_TOKENS = 2, 3
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def make_batch(seed: int, seqs, *, group: int, head_dim: int, dtype):
    """(q, cache, meta) with NaN wherever no live sequence's data is."""
    rng = np.random.default_rng(seed)
    seqs = [seqs[i] for i in rng.permutation(len(seqs))]
    pages_needed = [-(-kv // BLOCK_SIZE) for _, kv in seqs]
    num_seqs, pages = len(seqs) + PAD_SEQS, max(pages_needed) + 1
    num_blocks = sum(pages_needed) + 4
    perm = rng.permutation(num_blocks)
    tables = rng.integers(0, num_blocks, size=(num_seqs, pages))  # unused: arbitrary pages
    cache = np.full((num_blocks, NUM_LAYERS, 2, BLOCK_SIZE, NUM_KV_HEADS, head_dim), np.nan,
                    np.float32)
    num_tokens = sum(q for q, _ in seqs) + PAD_TOKENS
    q = np.full((num_tokens, NUM_KV_HEADS * group, head_dim), np.nan, np.float32)
    qsl, used = [0], 0
    for s, ((q_len, kv_len), n) in enumerate(zip(seqs, pages_needed)):
        tables[s, :n] = perm[used:used + n]
        used += n
        for pos in range(kv_len):
            cache[tables[s, pos // BLOCK_SIZE], LAYER, :, pos % BLOCK_SIZE] = rng.normal(
                size=(2, NUM_KV_HEADS, head_dim))
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
    ("tpu", DECODE, 4, 128, jnp.bfloat16, None, None),
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


@pytest.mark.parametrize("variant,dtype", [("gpu", jnp.bfloat16), ("tpu", jnp.float32)])
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


def test_gpu_kernels_lower_to_triton():
    """Without a GPU, at least check every GPU kernel passes the Pallas Triton
    lowering (exported for CUDA; Triton-to-PTX compilation needs a device)."""
    from jax import export

    q, cache, meta = make_batch(0, MIXED, group=4, head_dim=64, dtype=jnp.bfloat16)
    k = jnp.zeros((q.shape[0], NUM_KV_HEADS, 64), jnp.bfloat16)
    groups = block_copy.groups_array(GROUPS, 8)
    ops = dispatch._VARIANTS["gpu"]
    calls = [
        (lambda q, c, l, m: ops.attend(q, c, l, m, scale=0.125, sliding_window=8, soft_cap=30.0),
         (q, cache, jnp.int32(1), meta)),
        (ops.write_kv, (cache, jnp.int32(1), k, k, meta.slot_mapping)),
        (lambda c, g: ops.gather(c, g, 20), (cache, groups)),
        (ops.scatter, (cache, groups, cache[:20])),
    ]
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    for fn, args in calls:
        exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(*args)
        assert "triton" in exported.mlir_module()


def test_engine_greedy_matches_reference():
    from sluice.runtime import LLM, SamplingParams

    prompts = ["The quick brown fox", "a", "Sluice serves ragged batches of many lengths"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def run(backend: str) -> list[list[int]]:
        llm = LLM("tiny", attention_backend=backend, warmup=False, max_model_len=128,
                  max_num_seqs=4, max_num_batched_tokens=32, kv_cache_memory=1 << 20)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    assert run("pallas-interpret") == run("reference")
