"""The KV pool's head dimension on each platform, and how every attention and
KV-update implementation meets a pool whose head dimension is padded.

On TPU the last two dimensions of an array are tiled, ``(8·k, 128)`` lanes
wide, and XLA gives an HBM buffer the layout that wastes the least padding.
When ``head_dim`` is not a multiple of 128 (Qwen2's 64, Phi-3's 96) that is
not the row-major layout: XLA makes another dimension minor (the block's
tokens for ``[.., block_size, 2, 64]``, the block count for ``[.., 32, 96]``),
while a Mosaic kernel's operand is always row-major, so XLA copied the whole
pool into the kernel's layout and back around every attention and KV write
(compiled for v5e and v6e: both layouts, bfloat16 and float32). The kernel's
row-major layout pads ``head_dim`` to 128 lanes anyway, so a pool allocated
with ``head_dim`` padded to a multiple of 128 takes the same memory as that
layout, is row-major by default, and is never copied. Other platforms keep the
model's ``head_dim`` (no padding, nothing to gain).

KV heads. In a packed dtype (bfloat16: two rows per sublane) XLA also
re-lays out a pool whose KV-head count is not one it tiles row-major; compiled
for v5e (write_kv, ``[.., 16, H, 128|256]`` bf16): H = 2, 4, 8, 16, 24 (and
32) keep the row-major layout, H = 1, 3, 6, 12 were copied whole around every
kernel. Such a count is doubled on TPU when that makes it one of the good ones
(`pool_kv_heads`: 1 -> 2 for Gemma 3 270M/1B, 12 -> 24): each model head is
stored twice, pool heads ``2h`` and ``2h + 1``, so a pool with 1 KV head costs
what any padding to 2 would, and every reader stays exact without being told
the model's head count (below). Odd counts above 1 (3, 5, 7: SmolLM2's 3) are
not doubled (6, 10, 14 are no better) and still copy on TPU in bfloat16.

Padding is invisible to callers: the implementations take q/k/v at the model's
``head_dim`` and KV-head count and are wrapped by `pads_queries` / `pads_rows`,
which zero-pad head_dim to the pool's (slicing the output back) and write each
key/value head as many times as the pool repeats it. Zero lanes add nothing to
a score (``scale`` is passed explicitly, never derived from the pool), and the
padded lanes of values only produce output lanes that are cut off. A doubled
pool needs no head count from the caller: with ``G = Hq / H`` query heads per
model head, pool head ``j // (G / 2)`` of query head ``j`` is a copy of model
head ``j // G`` whenever ``G`` is even (the pool reads as a plain one with
``2H`` heads), and an odd ``G`` shows itself as ``Hq`` not divisible by the
pool's ``2H`` heads, when each query head is sent to both copies and one of
the two outputs kept.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

TPU_LANES = 128
# How many times the TPU pool stores each KV head when it repeats them.
KV_HEAD_COPIES = 2


def tpu_row_major_heads(num_kv_heads: int) -> bool:
    """Whether XLA keeps a packed (bfloat16) TPU pool with this many KV heads
    row-major: 2, 4 or a multiple of 8 (compiled for v5e; see the module note)."""
    return num_kv_heads >= 2 and (8 % num_kv_heads == 0 or num_kv_heads % 8 == 0)


def pool_kv_heads(num_kv_heads: int, platform: str, dtype) -> int:
    """The pool's KV-head count for a model's ``num_kv_heads`` on ``platform``
    in ``dtype``: doubled on TPU in a packed dtype when that turns a count XLA
    re-lays out into one it keeps row-major, else the model's."""
    packed = jnp.dtype(dtype).itemsize < 4
    doubled = num_kv_heads * KV_HEAD_COPIES
    if (platform == "tpu" and packed and not tpu_row_major_heads(num_kv_heads)
            and tpu_row_major_heads(doubled)):
        return doubled
    return num_kv_heads


def pool_head_dim(head_dim: int, platform: str) -> int:
    """The pool's last dimension for a model's ``head_dim`` on ``platform``."""
    if platform == "tpu":
        return -(-head_dim // TPU_LANES) * TPU_LANES
    return head_dim


def _pad_last(x: jax.Array, size: int) -> jax.Array:
    if size < x.shape[-1]:
        raise ValueError(f"head_dim: {x.shape[-1]} is larger than the KV pool's {size}")
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def _repeat_heads(x: jax.Array, pool_heads: int) -> jax.Array:
    """Keys/values ``[T, H, D]`` for a pool that stores each head
    ``pool_heads / H`` times (pool head ``r * h + i`` is head ``h``)."""
    heads = x.shape[1]
    if pool_heads == heads:
        return x
    if pool_heads % heads:
        raise ValueError(f"num_kv_heads: {heads} KV heads do not fit the KV pool's {pool_heads}")
    return jnp.repeat(x, pool_heads // heads, axis=1)


def pads_queries(attend: Callable) -> Callable:
    """Wrap ``attend(q, cache, layer, meta, **kw)``: queries are padded to the
    pool's head dimension (the output cut back to q's), and where the query
    heads do not divide among the pool's KV heads (a doubled pool, odd group)
    each query head is sent to both copies of its KV head and one output kept."""
    @functools.wraps(attend)
    def wrapper(q, cache, layer, meta, **kw):
        num_tokens, num_q_heads, head_dim = q.shape
        pool_heads = cache.shape[4]
        if head_dim != cache.shape[-1]:
            q = _pad_last(q, cache.shape[-1])
        copies = 1
        if num_q_heads % pool_heads:
            heads = pool_heads // KV_HEAD_COPIES
            if pool_heads % KV_HEAD_COPIES or num_q_heads % heads:
                raise ValueError(f"num_heads: {num_q_heads} query heads do not divide among "
                                 f"the KV pool's {pool_heads} KV heads")
            copies = KV_HEAD_COPIES
            q = q.reshape(num_tokens, heads, 1, num_q_heads // heads, -1)
            q = jnp.broadcast_to(q, (num_tokens, heads, copies) + q.shape[3:])
            q = q.reshape(num_tokens, num_q_heads * copies, -1)
        out = attend(q, cache, layer, meta, **kw)
        if copies > 1:
            out = out.reshape(num_tokens, heads, copies, -1, out.shape[-1])[:, :, 0]
            out = out.reshape(num_tokens, num_q_heads, -1)
        return out[..., :head_dim]
    return wrapper


def pads_rows(write: Callable) -> Callable:
    """Wrap ``write(cache, layer, k, v, slot_mapping, **kw)``: keys and values
    are padded to the pool's head dimension and written to every copy of
    their KV head."""
    @functools.wraps(write)
    def wrapper(cache, layer, k, v, slot_mapping, **kw):
        size = cache.shape[-1]
        if k.shape[-1] != size:
            k, v = _pad_last(k, size), _pad_last(v, size)
        k, v = _repeat_heads(k, cache.shape[4]), _repeat_heads(v, cache.shape[4])
        return write(cache, layer, k, v, slot_mapping, **kw)
    return wrapper
