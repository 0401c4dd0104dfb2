"""KV block gather/scatter in Pallas: the GPU and TPU copies behind the model
runner's block mover, which both preemption swap and live migration use (via
`sluice.pallas_kernels.dispatch`, which picks the variant per platform and
runs `reference.gather_blocks` / `scatter_blocks` elsewhere, e.g. on CPU).

Interface::

    gather_blocks_{gpu,tpu}(cache, groups, num_staged, *, interpret=False) -> staging
    scatter_blocks_{gpu,tpu}(cache, groups, staging, *, interpret=False) -> cache

A block is one contiguous slab ``cache[b]`` = ``[num_layers, 2, block_size,
kv_heads, head_dim]``. ``groups`` is int32 ``[G, 2]`` of ``(start, length)``
runs of consecutive blocks, as `BlockManager.block_groups` returns them
(`groups_array` pads a list to a fixed ``G`` with zero-length runs, so the
number of compiled programs stays bounded). Runs are staged back to back in
list order: staging row ``i`` holds the ``i``-th block of the concatenated
runs, i.e. the same result as `reference.gather_blocks(cache, ids)` with
``ids`` the runs expanded. Staging rows past the total length are unspecified
on gather and ignored on scatter. Scatter updates the pool in place (aliased).

How a run moves:

- TPU: a run is a byte range contiguous in both the pool and the staging
  buffer, so it moves as DMAs of whole runs, HBM to HBM. A DMA's size must be
  static (dynamic-size DMA slices are neither lowerable nor interpretable), so a
  run of length ``n`` is issued as one DMA per set bit of ``n`` (sizes 2^k
  blocks, at most ``log2(max_group_len) + 1``); a run whose length is a power of
  two is exactly one DMA. All DMAs of a run are in flight together. Runs are
  trimmed to the pool and the staging buffer first (`_clamped_runs`), so bad
  runs cannot DMA out of bounds.
- GPU (Triton): one launch for the whole list; each program copies one
  contiguous tile of one block slab, and consecutive programs cover a run's
  consecutive bytes, so a run streams as one coalesced range.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from sluice.pallas_kernels.platform import tpu_interpret_params

GPU_TILE = 4096  # elements per Triton program (largest power of two dividing the slab, at most)


def groups_array(groups: Sequence[tuple[int, int]], max_groups: int) -> jax.Array:
    """Pad ``(start, length)`` runs to an int32 ``[max_groups, 2]`` array."""
    if len(groups) > max_groups:
        raise ValueError(f"groups: {len(groups)} runs exceed max_groups={max_groups}")
    out = np.zeros((max_groups, 2), np.int32)
    out[:len(groups)] = np.asarray(groups, np.int32).reshape(-1, 2)
    return jnp.asarray(out)


def expand_groups(groups: Sequence[tuple[int, int]]) -> np.ndarray:
    """The block ids the runs stand for, in staging order."""
    return np.asarray([b for start, n in groups for b in range(start, start + n)], np.int32)


def _clamped_runs(groups: jax.Array, num_blocks: int, num_staged: int) -> jax.Array:
    """``[G, 3]`` int32 ``(start, length, staging offset)`` of each run, trimmed so
    no DMA can leave the pool or the staging buffer whatever ``groups`` holds
    (for valid runs this changes nothing: offsets follow list order as before)."""
    groups = groups.astype(jnp.int32)
    lengths = jnp.maximum(groups[:, 1], 0)
    offsets = jnp.cumsum(lengths) - lengths
    starts = jnp.clip(groups[:, 0], 0, num_blocks)
    lengths = jnp.minimum(lengths, jnp.minimum(num_blocks - starts,
                                               jnp.maximum(num_staged - offsets, 0)))
    return jnp.stack([starts, lengths, jnp.minimum(offsets, num_staged)], axis=1)


# -- GPU (Pallas Triton) --------------------------------------------------------


def staging_sources(groups: jax.Array, num_rows: int) -> jax.Array:
    """For each staging row, the pool block it mirrors, or -1 past the total."""
    ends = jnp.cumsum(groups[:, 1])
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(ends, rows, side="right"), groups.shape[0] - 1)
    src = groups[g, 0] + rows - (ends[g] - groups[g, 1])
    return jnp.where(rows < ends[-1], src, -1).astype(jnp.int32)


def _pool_sources(groups: jax.Array, num_rows: int, num_blocks: int) -> jax.Array:
    """`staging_sources`, with -1 (skip) for any block outside the pool, so no
    run can make a GPU program read or write past it (rows keep their
    list-order staging offsets, as the TPU variant's trimmed runs do)."""
    src = staging_sources(groups.astype(jnp.int32), num_rows)
    return jnp.where(src < num_blocks, src, -1)


def _tile(slab: int) -> int:
    return min(GPU_TILE, slab & -slab)


def _gpu_gather_kernel(tile: int, src_ref, cache_ref, out_ref):
    row, i = pl.program_id(0), pl.program_id(1)
    src = src_ref[row]

    @pl.when(src >= 0)
    def _():
        cols = pl.ds(i * tile, tile)
        out_ref[row, cols] = cache_ref[src, cols]


def _gpu_scatter_kernel(tile: int, src_ref, staging_ref, cache_in_ref, cache_ref):
    del cache_in_ref  # aliased to cache_ref
    row, i = pl.program_id(0), pl.program_id(1)
    dst = src_ref[row]

    @pl.when(dst >= 0)
    def _():
        cols = pl.ds(i * tile, tile)
        cache_ref[dst, cols] = staging_ref[row, cols]


def gather_blocks_gpu(cache: jax.Array, groups: jax.Array, num_staged: int, *,
                      interpret: bool = False) -> jax.Array:
    flat = cache.reshape(cache.shape[0], -1)  # free: a block is one contiguous slab
    tile = _tile(flat.shape[1])
    whole = pl.no_block_spec
    out = pl.pallas_call(
        functools.partial(_gpu_gather_kernel, tile),
        out_shape=jax.ShapeDtypeStruct((num_staged, flat.shape[1]), cache.dtype),
        grid=(num_staged, flat.shape[1] // tile),
        in_specs=[whole, whole],
        out_specs=whole,
        compiler_params=pltriton.CompilerParams(num_warps=4),
        interpret=interpret,
        name="sluice_gather_blocks",
    )(_pool_sources(groups, num_staged, cache.shape[0]), flat)
    return out.reshape((num_staged,) + cache.shape[1:])


def scatter_blocks_gpu(cache: jax.Array, groups: jax.Array, staging: jax.Array, *,
                       interpret: bool = False) -> jax.Array:
    flat = cache.reshape(cache.shape[0], -1)
    staged = staging.astype(cache.dtype).reshape(staging.shape[0], -1)
    tile = _tile(flat.shape[1])
    whole = pl.no_block_spec
    out = pl.pallas_call(
        functools.partial(_gpu_scatter_kernel, tile),
        out_shape=jax.ShapeDtypeStruct(flat.shape, cache.dtype),
        grid=(staged.shape[0], flat.shape[1] // tile),
        in_specs=[whole] * 3,
        out_specs=whole,
        input_output_aliases={2: 0},
        compiler_params=pltriton.CompilerParams(num_warps=4),
        interpret=interpret,
        name="sluice_scatter_blocks",
    )(_pool_sources(groups, staged.shape[0], cache.shape[0]), staged, flat)
    return out.reshape(cache.shape)


# -- TPU (Mosaic) ---------------------------------------------------------------


def _run_copies(num_bits: int, start, length, offset, src_hbm, dst_hbm, sems,
                to_staging: bool) -> None:
    """DMA one run as power-of-two pieces (one per set bit of its length)."""
    pieces = []
    for k in range(num_bits):
        size = 1 << k
        done = (length >> (k + 1)) << (k + 1)  # blocks covered by the higher bits
        src_at, dst_at = start + done, offset + done
        if not to_staging:
            src_at, dst_at = dst_at, src_at
        pieces.append(((length >> k) & 1 == 1,
                       pltpu.make_async_copy(src_hbm.at[pl.ds(src_at, size)],
                                             dst_hbm.at[pl.ds(dst_at, size)], sems.at[k])))
    for present, copy in pieces:
        pl.when(present)(copy.start)
    for present, copy in pieces:
        pl.when(present)(copy.wait)


def _tpu_gather_kernel(num_bits, runs_ref, cache_hbm, out_hbm, sems):
    g = pl.program_id(0)
    _run_copies(num_bits, runs_ref[g, 0], runs_ref[g, 1], runs_ref[g, 2], cache_hbm,
                out_hbm, sems, to_staging=True)


def _tpu_scatter_kernel(num_bits, runs_ref, staging_hbm, cache_in_hbm, cache_hbm, sems):
    del cache_in_hbm  # aliased to cache_hbm
    g = pl.program_id(0)
    _run_copies(num_bits, runs_ref[g, 0], runs_ref[g, 1], runs_ref[g, 2], staging_hbm,
                cache_hbm, sems, to_staging=False)


def _tpu_call(kernel, num_bits: int, num_groups: int, num_inputs: int, out_shape, aliases,
              interpret: bool):
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(num_groups,),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * num_inputs,
        out_specs=pl.BlockSpec(memory_space=pl.ANY),
        scratch_shapes=[pltpu.SemaphoreType.DMA((num_bits,))],
    )
    return pl.pallas_call(
        functools.partial(kernel, num_bits), out_shape=out_shape, grid_spec=grid_spec,
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=tpu_interpret_params() if interpret else False,
        name=kernel.__name__.strip("_"),
    )


def gather_blocks_tpu(cache: jax.Array, groups: jax.Array, num_staged: int, *,
                      interpret: bool = False) -> jax.Array:
    call = _tpu_call(_tpu_gather_kernel, num_staged.bit_length(), groups.shape[0], 1,
                     jax.ShapeDtypeStruct((num_staged,) + cache.shape[1:], cache.dtype), {},
                     interpret)
    return call(_clamped_runs(groups, cache.shape[0], num_staged), cache)


def scatter_blocks_tpu(cache: jax.Array, groups: jax.Array, staging: jax.Array, *,
                       interpret: bool = False) -> jax.Array:
    num_staged = staging.shape[0]
    call = _tpu_call(_tpu_scatter_kernel, num_staged.bit_length(), groups.shape[0], 2,
                     jax.ShapeDtypeStruct(cache.shape, cache.dtype), {2: 0}, interpret)
    return call(_clamped_runs(groups, cache.shape[0], num_staged), staging.astype(cache.dtype),
                cache)
