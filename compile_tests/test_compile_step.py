"""The engine's whole step (`model_runner._forward_logits`: every layer's KV
write and attention for a decode group and a prefill group, then the logits)
compiled for each target with the KV pool donated, as the engine runs it.

Models are built from their Hugging Face ``config.json`` fields (so the step is
the one a real checkpoint gets): Llama-3-8B, Qwen2-7B with its sliding
window switched on in every layer, Qwen2-0.5B (head_dim 64, 2 KV heads) and
Gemma 3 270M (one KV head of 256: the bfloat16 TPU pool has a padding head,
`pool_layout.pool_kv_heads`; sliding and full layers) and SmolLM2-135M (3 KV
heads of 64, padded to 4). The layer loop is a
scan, so the compiled layer is the same at any depth; where a model's bfloat16 weights would not fit
the chip (Llama-3-8B's 16 GB on a 16 GiB v5e, which serves it sharded over
several chips), the step keeps as many of its layers as fit in half the memory.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compile_tests.check import assert_kernels, assert_pool_in_place, record, sds
from compile_tests.targets import device
from sluice.runtime import model_runner
from sluice.runtime.attention import AttentionMetadata
from sluice.runtime.config import ModelConfig
from sluice.runtime.kv_cache import KVCacheSpec, num_blocks_for_budget
from sluice.runtime.model import param_shapes

LLAMA3_8B = dict(
    architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
    rope_theta=500000.0, tie_word_embeddings=False,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=8192))
QWEN2_7B_WINDOWED = dict(
    architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=3584,
    intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
    rope_theta=1000000.0, tie_word_embeddings=False, use_sliding_window=True,
    sliding_window=4096, max_window_layers=0)
# head_dim 64 with 2 KV heads: the TPU pool's head dimension is padded (see
# `pool_layout`); before that, XLA copied this pool around every kernel.
QWEN2_05B = dict(
    architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=896,
    intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
    rope_theta=1000000.0, tie_word_embeddings=True)
# Gemma 3 270M's config.json (text fields).
GEMMA3_270M = dict(
    architectures=["Gemma3ForCausalLM"], vocab_size=262144, hidden_size=640,
    intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
    num_key_value_heads=1, head_dim=256, max_position_embeddings=32768, rms_norm_eps=1e-6,
    rope_theta=1000000.0, rope_local_base_freq=10000.0, sliding_window=512,
    query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
# SmolLM2-135M's config.json: 3 KV heads of 64, which the bfloat16 TPU pool
# pads to 4 (`pool_layout.pool_kv_heads`; with 3, XLA copied it around every
# KV write).
SMOLLM2_135M = dict(
    architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
    intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True)
MODELS = {"gemma3-270m": GEMMA3_270M, "llama3-8b": LLAMA3_8B,
          "qwen2-7b-window": QWEN2_7B_WINDOWED, "qwen2-0.5b": QWEN2_05B,
          "smollm2-135m": SMOLLM2_135M}

# The engine's mixed step shape: a decode group of max_num_seqs rows plus a
# prefill group, both with the block-table width of max_model_len.
MAX_NUM_SEQS, PREFILL_SEQS, PREFILL_TOKENS, MAX_MODEL_LEN = 64, 4, 2048, 8192
STEP_BLOCK_SIZES = {"gemma3-270m": 32, "llama3-8b": 16, "qwen2-7b-window": 64, "qwen2-0.5b": 32,
                    "smollm2-135m": 16}
DTYPE = jnp.bfloat16


def _fitting(cfg: ModelConfig, hbm_bytes: int) -> ModelConfig:
    """``cfg`` with as many layers as fit in half of ``hbm_bytes`` (weights)."""
    shapes = param_shapes(cfg)
    per_layer = sum(int(np.prod(s[1:])) for s in shapes["layers"].values()) * 2
    rest = sum(int(np.prod(s)) for k, s in shapes.items() if k != "layers") * 2
    layers = min(cfg.num_layers, (hbm_bytes // 2 - rest) // per_layer)
    assert layers >= 1, "not even one layer fits"
    return dataclasses.replace(cfg, num_layers=int(layers))


def _group(target, seqs: int, tokens: int, max_q: int, pages: int) -> AttentionMetadata:
    i32 = jnp.int32
    return AttentionMetadata(sds(target, (tokens,), i32), sds(target, (seqs + 1,), i32),
                             sds(target, (seqs,), i32), sds(target, (seqs, pages), i32),
                             sds(target, (), i32), max_query_len=max_q)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_engine_step_compiles_in_place(target, model):
    cfg = _fitting(ModelConfig.from_hf_dict(MODELS[model]), target.hbm_bytes)
    block = STEP_BLOCK_SIZES[model]
    pages = MAX_MODEL_LEN // block
    # The pool the engine allocates on this target, an eighth of memory.
    num_blocks = num_blocks_for_budget(cfg, target.hbm_bytes // 8, block, DTYPE, device(target))
    params = jax.tree_util.tree_map(lambda s: sds(target, s, DTYPE), param_shapes(cfg),
                                    is_leaf=lambda x: isinstance(x, tuple))
    pool = sds(target, KVCacheSpec.for_model(cfg, num_blocks, block, DTYPE, device(target)).shape,
               DTYPE)
    tokens = MAX_NUM_SEQS + PREFILL_TOKENS
    metas = (_group(target, MAX_NUM_SEQS, MAX_NUM_SEQS, 1, pages),
             _group(target, PREFILL_SEQS, PREFILL_TOKENS, PREFILL_TOKENS, pages))
    args = (params, pool, sds(target, (tokens,), jnp.int32), sds(target, (tokens,), jnp.int32),
            metas, sds(target, (MAX_NUM_SEQS + PREFILL_SEQS,), jnp.int32))

    # The engine's own jitted step (static cfg and backend, the pool donated).
    start = time.perf_counter()
    compiled = model_runner._forward_logits.lower(*args, cfg=cfg, backend="pallas").compile()
    seconds = time.perf_counter() - start
    hlo = compiled.as_text()
    # Per layer: each group's KV write and attention.
    assert_kernels(hlo, target, at_least=4)
    assert_pool_in_place(hlo, len(jax.tree_util.tree_leaves(params)), pool.shape)
    record(target, compiled, seconds, kernel="engine_step", model=model, layers=cfg.num_layers,
           block=block, dtype="bfloat16")
