"""KV cache update in Pallas: store a step's new keys/values in their pages.

Interface (same as `reference.write_kv`, plus ``interpret``)::

    write_kv_{gpu,tpu}(cache, layer, k, v, slot_mapping, *, interpret=False) -> cache

``k``/``v`` are ``[T, kv_heads, head_dim]``; token ``t`` goes to block
``slot // block_size``, offset ``slot % block_size`` of ``layer``. Slots
``>= num_slots`` (padding) are skipped, so nothing is clamped onto a real page
(negative slots too: no metadata makes a kernel write outside the pool).
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
from sluice.pallas_kernels.pool_layout import pads_rows


def row_pieces(n: int) -> list[tuple[int, int]]:
    """``(offset, size)`` power-of-two pieces covering ``[0, n)``, largest
    first (one per set bit of ``n``): Triton blocks must be powers of two, and
    static in-bounds pieces need neither padding nor masks."""
    pieces, offset = [], 0
    for bit in reversed(range(n.bit_length())):
        if n >> bit & 1:
            pieces.append((offset, 1 << bit))
            offset += 1 << bit
    return pieces


def _gpu_kernel(num_slots: int, block_size: int, num_layers: int, row: int, slots_ref,
                layer_ref, k_ref, v_ref, cache_in_ref, cache_ref):
    del cache_in_ref  # aliased to cache_ref
    t = pl.program_id(0)
    slot = slots_ref[t]

    # Guard: only slots of the pool are written, and only its layers.
    @pl.when((slot >= 0) & (slot < num_slots))
    def _():
        block, offset = slot // block_size, slot % block_size
        layer = jnp.clip(layer_ref[0], 0, num_layers - 1)
        for start, size in row_pieces(row):
            cols = pl.ds(start, size)
            cache_ref[block, layer, 0, offset, cols] = k_ref[t, cols].astype(cache_ref.dtype)
            cache_ref[block, layer, 1, offset, cols] = v_ref[t, cols].astype(cache_ref.dtype)


@pads_rows
def write_kv_gpu(cache: jax.Array, layer, k: jax.Array, v: jax.Array, slot_mapping: jax.Array,
                 *, interpret: bool = False) -> jax.Array:
    """Pallas-Triton variant: one program per token stores its keys and values
    for every KV head, one contiguous ``kv_heads * head_dim`` row each (a free
    reshape of the pool), in power-of-two pieces, so any head_dim compiles."""
    num_tokens, num_kv_heads, head_dim = k.shape
    num_blocks, num_layers, _, block_size = cache.shape[:4]
    row = num_kv_heads * head_dim
    flat = cache.reshape(num_blocks, num_layers, 2, block_size, row)
    whole = pl.no_block_spec
    out = pl.pallas_call(
        functools.partial(_gpu_kernel, num_blocks * block_size, block_size, num_layers, row),
        out_shape=jax.ShapeDtypeStruct(flat.shape, cache.dtype),
        grid=(num_tokens,),
        in_specs=[whole] * 5,
        out_specs=whole,
        input_output_aliases={4: 0},
        compiler_params=pltriton.CompilerParams(num_warps=4 if row >= 512 else 1),
        interpret=interpret,
        name="sluice_write_kv",
    )(slot_mapping.astype(jnp.int32), jnp.asarray(layer, jnp.int32).reshape(1),
      k.reshape(num_tokens, row), v.reshape(num_tokens, row), flat)
    return out.reshape(cache.shape)


TPU_CHUNK = 256  # tokens whose DMAs one TPU program keeps in flight together


def _tpu_kernel(num_tokens: int, num_slots: int, block_size: int, chunk: int, slots_ref,
                layer_ref, k_hbm, v_hbm, cache_in_hbm, cache_hbm, sems):
    del cache_in_hbm  # aliased to cache_hbm
    first = pl.program_id(0) * chunk
    layer = layer_ref[0]

    def copies(t):
        slot = slots_ref[t]
        dst = cache_hbm.at[slot // block_size, layer]
        return [pltpu.make_async_copy(src.at[t], dst.at[kv, slot % block_size], sems.at[kv])
                for kv, src in enumerate((k_hbm, v_hbm))]

    def live(t):
        slot = slots_ref[jnp.minimum(t, num_tokens - 1)]
        return (t < num_tokens) & (slot >= 0) & (slot < num_slots)

    def each(action: str):
        def body(i, carry):
            t = first + i

            @pl.when(live(t))
            def _():
                for c in copies(t):
                    getattr(c, action)()
            return carry
        jax.lax.fori_loop(0, chunk, body, 0)

    each("start")  # all of the chunk's copies in flight at once,
    each("wait")   # then drained


@pads_rows
def write_kv_tpu(cache: jax.Array, layer, k: jax.Array, v: jax.Array, slot_mapping: jax.Array,
                 *, interpret: bool = False) -> jax.Array:
    """Mosaic-TPU variant: slots in SMEM (scalar prefetch); each token's
    ``[kv_heads, head_dim]`` keys and values are one HBM-to-HBM DMA each into
    ``cache[block, layer, kv, offset]`` (the token offset is an untiled
    dimension, so any offset is aligned in every dtype). A program issues the
    copies of ``TPU_CHUNK`` tokens before waiting for any. Slots outside
    ``[0, num_slots)`` and a layer outside the pool are never written."""
    num_tokens = k.shape[0]
    block_size = cache.shape[3]
    num_slots = cache.shape[0] * block_size
    chunk = min(TPU_CHUNK, num_tokens)
    layer = jnp.clip(jnp.asarray(layer, jnp.int32), 0, cache.shape[1] - 1).reshape(1)
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(pl.cdiv(num_tokens, chunk),),
        in_specs=[hbm] * 3,
        out_specs=hbm,
        scratch_shapes=[pltpu.SemaphoreType.DMA((2,))],
    )
    return pl.pallas_call(
        functools.partial(_tpu_kernel, num_tokens, num_slots, block_size, chunk),
        out_shape=jax.ShapeDtypeStruct(cache.shape, cache.dtype),
        grid_spec=grid_spec,
        input_output_aliases={4: 0},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=tpu_interpret_params() if interpret else False,
        name="sluice_write_kv",
    )(slot_mapping.astype(jnp.int32), layer, k.astype(cache.dtype), v.astype(cache.dtype), cache)
