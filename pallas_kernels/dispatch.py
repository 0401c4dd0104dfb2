"""Pick a kernel variant by the platform a computation is compiled for.

``write_kv`` / ``ragged_paged_attention`` / ``gather_blocks`` /
``scatter_blocks`` take the reference signatures (the block copies take runs,
see `block_copy`). Each binds one primitive whose lowering is registered per
platform, so the variant is chosen when XLA lowering knows the target:

- ``tpu``: the Mosaic TPU kernels;
- ``cuda`` / ``rocm``: the Pallas Triton kernels;
- anything else (CPU): pure JAX, the fastest correct path there: the
  reference's KV update and block copies, and `chunked` attention
  (interpreted kernels are for testing, not serving).

The target is the platform of the devices the arguments live on (an engine
pinned to a device), of the topology devices an ahead-of-time
``jit(...).lower(...)`` is given, or each of ``jax.export(platforms=...)``;
never ``jax.default_backend()`` at trace time, which made exports and AOT
compiles from a CPU host silently get the CPU path. Only the chosen variant is
traced, during lowering, so CPU compiles cost what they did before.

Pallas kernels ask the default device (or an abstract mesh) which chip they
target (TPU generation; GPU compute capability on JAX 0.12). When lowering for
a known device that is not the default one (an AOT compile from a CPU host),
the rule makes that device the default while the kernel lowers. An export with
no devices at all (``jax.export`` for ``tpu`` on a host without one) still
needs the caller's ``jax.sharding.use_abstract_mesh`` naming the chip. GPU
attention is also handed the device it is compiled for, the one whose SMs and
shared memory size its grid and tiles (`ragged_attention.gpu_sm_count`,
`ragged_attention.gpu_shared_memory`); None where the lowering names none.

`interpreted(variant)` returns the same four operations running a variant's
kernels in interpret mode on any platform, which is how CPU tests exercise them.
"""

from __future__ import annotations

import contextlib
import functools
from types import SimpleNamespace
from typing import Callable

import jax
from jax.extend.core import Primitive
from jax.interpreters import mlir

from sluice.pallas_kernels import block_copy, chunked, kv_update, ragged_attention, reference
from sluice.pallas_kernels.metadata import AttentionMetadata


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
_CPU = SimpleNamespace(write_kv=reference.write_kv, attend=chunked.ragged_paged_attention,
                       gather=_reference_gather, scatter=_reference_scatter)
# Lowering platform -> variant; platforms not listed lower the CPU path.
PLATFORM_VARIANTS = {"tpu": "tpu", "cuda": "gpu", "rocm": "gpu"}
# (variant, operation) whose implementation sizes itself for the target device.
SIZED_BY_DEVICE = {("gpu", "attend")}


# -- one primitive per operation ----------------------------------------------


def _target_device(ctx) -> jax.Device | None:
    """The device this lowering compiles for: the first of the computation's
    device assignment, else the first of its backend's (None: an export)."""
    assigned = getattr(ctx.module_context.axis_context, "device_assignment", None)
    if assigned:
        return assigned[0]
    backend = ctx.module_context.backend
    return backend.devices()[0] if backend is not None else None


def _lowering(op: str, ops: SimpleNamespace, sized_by_device: bool = False) -> Callable:
    """A lowering rule that traces ``ops``' implementation of ``op`` (passed
    ``device=``, the target device, where ``sized_by_device``)."""
    def rule(ctx, *args, **params):
        device = _target_device(ctx)
        if sized_by_device:
            params = dict(params, device=device)
        impl = functools.partial(_CALLS[op], getattr(ops, op), **params)
        foreign = device is not None and device.platform != jax.default_backend()
        with jax.default_device(device) if foreign else contextlib.nullcontext():
            return mlir.lower_fun(impl, multiple_results=False)(ctx, *args)
    return rule


def _eager(prim: Primitive, *args, **params):
    return _jitted(prim, tuple(sorted(params.items())))(*args)


@functools.lru_cache(maxsize=None)
def _jitted(prim: Primitive, params: tuple) -> Callable:
    return jax.jit(functools.partial(prim.bind, **dict(params)))


def _primitive(op: str, abstract_eval: Callable) -> Primitive:
    prim = Primitive(f"sluice_{op}")
    prim.def_abstract_eval(abstract_eval)
    prim.def_impl(functools.partial(_eager, prim))
    mlir.register_lowering(prim, _lowering(op, _CPU))
    for platform, variant in PLATFORM_VARIANTS.items():
        rule = _lowering(op, _VARIANTS[variant], (variant, op) in SIZED_BY_DEVICE)
        mlir.register_lowering(prim, rule, platform=platform)
    return prim


# How each primitive's flat operands and parameters call a variant's function.
_CALLS: dict[str, Callable] = {
    "write_kv": lambda fn, cache, layer, k, v, slots: fn(cache, layer, k, v, slots),
    "attend": lambda fn, q, cache, layer, *meta, meta_tree, **kw: fn(
        q, cache, layer, jax.tree_util.tree_unflatten(meta_tree, meta), **kw),
    "gather": lambda fn, cache, groups, *, num_staged: fn(cache, groups, num_staged),
    "scatter": lambda fn, cache, groups, staging: fn(cache, groups, staging),
}

_write_kv_p = _primitive("write_kv", lambda cache, *_: cache)
_attend_p = _primitive("attend", lambda q, *_, **__: q)
_gather_p = _primitive("gather", lambda cache, groups, *, num_staged: cache.update(
    shape=(num_staged,) + cache.shape[1:]))
_scatter_p = _primitive("scatter", lambda cache, *_: cache)


def write_kv(cache, layer, k, v, slot_mapping):
    return _write_kv_p.bind(cache, jax.numpy.asarray(layer), k, v, slot_mapping)


def ragged_paged_attention(q, cache, layer, meta: AttentionMetadata, *, scale,
                           sliding_window=None, soft_cap=None, num_kv_heads=None):
    leaves, tree = jax.tree_util.tree_flatten(meta)
    return _attend_p.bind(q, cache, jax.numpy.asarray(layer), *leaves, meta_tree=tree,
                          scale=float(scale), sliding_window=sliding_window,
                          soft_cap=None if soft_cap is None else float(soft_cap),
                          num_kv_heads=None if num_kv_heads is None else int(num_kv_heads))


def gather_blocks(cache, groups, num_staged: int):
    return _gather_p.bind(cache, groups, num_staged=int(num_staged))


def scatter_blocks(cache, groups, staging):
    return _scatter_p.bind(cache, groups, staging)


def interpreted(variant: str) -> SimpleNamespace:
    """``variant``'s kernels ("gpu" or "tpu") in interpret mode, for any platform."""
    ops = _VARIANTS[variant]
    return SimpleNamespace(**{name: functools.partial(fn, interpret=True)
                              for name, fn in vars(ops).items()})
