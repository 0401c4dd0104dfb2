"""KV cache update in Pallas: store a step's new keys/values in their pages.

Interface (same as `reference.write_kv`, plus ``interpret``)::

    write_kv_{gpu,tpu}(cache, layer, k, v, slot_mapping, *, interpret=False) -> cache

``k``/``v`` are ``[T, kv_heads, head_dim]``; token ``t`` goes to block
``slot // block_size``, offset ``slot % block_size`` of ``layer``. Slots
``>= num_slots`` (padding) are skipped, so nothing is clamped onto a real page.
The pool is aliased input-to-output, so the update is in place and costs only
the bytes written. It is a separate kernel from attention so that both the
decode and the prefill group of a step write before either attends.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from sluice.pallas_kernels.platform import tpu_interpret_params


def _gpu_kernel(num_slots: int, block_size: int, slots_ref, layer_ref, k_ref, v_ref,
                cache_in_ref, cache_ref):
    del cache_in_ref  # aliased to cache_ref
    t, h = pl.program_id(0), pl.program_id(1)
    slot = slots_ref[t]

    @pl.when(slot < num_slots)
    def _():
        block, offset, layer = slot // block_size, slot % block_size, layer_ref[0]
        cache_ref[block, layer, 0, offset, h, :] = k_ref[t, h, :].astype(cache_ref.dtype)
        cache_ref[block, layer, 1, offset, h, :] = v_ref[t, h, :].astype(cache_ref.dtype)


def write_kv_gpu(cache: jax.Array, layer, k: jax.Array, v: jax.Array, slot_mapping: jax.Array,
                 *, interpret: bool = False) -> jax.Array:
    """Pallas-Triton variant: one program per (token, KV head) stores a
    ``head_dim`` row of keys and of values."""
    num_tokens, num_kv_heads, _ = k.shape
    block_size = cache.shape[3]
    num_slots = cache.shape[0] * block_size
    whole = pl.no_block_spec
    return pl.pallas_call(
        functools.partial(_gpu_kernel, num_slots, block_size),
        out_shape=jax.ShapeDtypeStruct(cache.shape, cache.dtype),
        grid=(num_tokens, num_kv_heads),
        in_specs=[whole] * 5,
        out_specs=whole,
        input_output_aliases={4: 0},
        compiler_params=pltriton.CompilerParams(num_warps=1),
        interpret=interpret,
        name="sluice_write_kv",
    )(slot_mapping.astype(jnp.int32), jnp.asarray(layer, jnp.int32).reshape(1), k, v, cache)


def _tpu_kernel(num_slots: int, block_size: int, slots_ref, layer_ref, k_ref, v_ref,
                cache_in_hbm, cache_hbm, sems):
    del cache_in_hbm  # aliased to cache_hbm
    slot = slots_ref[pl.program_id(0)]

    @pl.when(slot < num_slots)
    def _():
        block, offset, layer = slot // block_size, slot % block_size, layer_ref[0]
        copies = [pltpu.make_async_copy(src, cache_hbm.at[block, layer, kv, offset], sems.at[kv])
                  for kv, src in enumerate((k_ref, v_ref))]
        for c in copies:
            c.start()
        for c in copies:
            c.wait()


def write_kv_tpu(cache: jax.Array, layer, k: jax.Array, v: jax.Array, slot_mapping: jax.Array,
                 *, interpret: bool = False) -> jax.Array:
    """Mosaic-TPU variant: slots in SMEM (scalar prefetch); each token's
    ``[kv_heads, head_dim]`` keys and values are DMA'd from VMEM to their slot."""
    num_tokens, num_kv_heads, head_dim = k.shape
    block_size = cache.shape[3]
    num_slots = cache.shape[0] * block_size
    row = pl.BlockSpec((None, num_kv_heads, head_dim), lambda t, *_: (t, 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(num_tokens,),
        in_specs=[row, row, pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec(memory_space=pl.ANY),
        scratch_shapes=[pltpu.SemaphoreType.DMA((2,))],
    )
    return pl.pallas_call(
        functools.partial(_tpu_kernel, num_slots, block_size),
        out_shape=jax.ShapeDtypeStruct(cache.shape, cache.dtype),
        grid_spec=grid_spec,
        input_output_aliases={4: 0},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=tpu_interpret_params() if interpret else False,
        name="sluice_write_kv",
    )(slot_mapping.astype(jnp.int32), jnp.asarray(layer, jnp.int32).reshape(1),
      k.astype(cache.dtype), v.astype(cache.dtype), cache)
