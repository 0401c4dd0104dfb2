"""Pick a kernel variant by platform: the entry points the runtime registers.

``write_kv`` / ``ragged_paged_attention`` / ``gather_blocks`` /
``scatter_blocks`` take the reference signatures (the block copies take runs,
see `block_copy`) and choose, from ``jax.default_backend()`` at trace time:

- ``tpu``: the Mosaic TPU kernels;
- ``gpu``: the Pallas Triton kernels;
- anything else (CPU): pure JAX, the fastest correct path there: the
  reference's KV update and block copies, and `chunked` attention
  (interpreted kernels are for testing, not serving).

`interpreted(variant)` returns the same four operations running a variant's
kernels in interpret mode on any platform, which is how CPU tests exercise them.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import jax

from sluice.pallas_kernels import block_copy, chunked, kv_update, ragged_attention, reference


def _reference_gather(cache, groups, num_staged):
    return reference.gather_blocks(cache, _staged_ids(cache, groups, num_staged))


def _reference_scatter(cache, groups, staging):
    ids = _staged_ids(cache, groups, staging.shape[0])
    return cache.at[ids].set(staging.astype(cache.dtype), mode="drop")


def _staged_ids(cache, groups, num_staged):
    """Pool block of each staging row (out of range past the runs' total)."""
    src = block_copy.staging_sources(groups.astype(jax.numpy.int32), num_staged)
    return jax.numpy.where(src >= 0, src, cache.shape[0])


_VARIANTS = {
    "gpu": SimpleNamespace(write_kv=kv_update.write_kv_gpu,
                           attend=ragged_attention.ragged_paged_attention_gpu,
                           gather=block_copy.gather_blocks_gpu,
                           scatter=block_copy.scatter_blocks_gpu),
    "tpu": SimpleNamespace(write_kv=kv_update.write_kv_tpu,
                           attend=ragged_attention.ragged_paged_attention_tpu,
                           gather=block_copy.gather_blocks_tpu,
                           scatter=block_copy.scatter_blocks_tpu),
}
_CPU = SimpleNamespace(write_kv=reference.write_kv,
                       attend=chunked.ragged_paged_attention,
                             gather=_reference_gather, scatter=_reference_scatter)


def _for_platform() -> SimpleNamespace:
    return _VARIANTS.get(jax.default_backend(), _CPU)


def write_kv(cache, layer, k, v, slot_mapping):
    return _for_platform().write_kv(cache, layer, k, v, slot_mapping)


def ragged_paged_attention(q, cache, layer, meta, *, scale, sliding_window=None, soft_cap=None):
    return _for_platform().attend(q, cache, layer, meta, scale=scale,
                                  sliding_window=sliding_window, soft_cap=soft_cap)


def gather_blocks(cache, groups, num_staged):
    return _for_platform().gather(cache, groups, num_staged)


def scatter_blocks(cache, groups, staging):
    return _for_platform().scatter(cache, groups, staging)


def interpreted(variant: str) -> SimpleNamespace:
    """``variant``'s kernels ("gpu" or "tpu") in interpret mode, for any platform."""
    ops = _VARIANTS[variant]
    return SimpleNamespace(**{name: functools.partial(fn, interpret=True)
                              for name, fn in vars(ops).items()})
