"""The KV pool's head dimension and KV-head count on each platform, and how
every attention and KV-update implementation meets a pool where they are padded.

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
kernel (SmolLM2's 3 around every KV write). On TPU in a packed dtype such a
count is padded to the next one XLA keeps row-major (`pool_kv_heads`: 1 -> 2
for Gemma 3 270M/1B, 3 -> 4 for SmolLM2-135M, 5..7 -> 8, 12 -> 16), the least
memory any such pool takes. The pool's heads past the model's are padding: no
query reads them, and writes store copies of the model's heads there (pool
head ``i`` holds model head ``i % H``: the bytes zeros would cost). Readers are
told the model's KV-head count (``num_kv_heads``; None: the pool's own), which
no layout of the pool alone can tell them (12 query heads over a 4-head pool
are 3 groups of 4 with one padding head, or 4 groups of 3); the copies make a
pool whose count is a multiple of the model's (1 -> 2, an even number of query
heads) read right without it too, as such pools did before ``num_kv_heads``.

Padding is invisible to callers: the implementations take q/k/v at the model's
``head_dim`` and KV-head count and are wrapped by `pads_queries` / `pads_rows`,
which zero-pad head_dim to the pool's (slicing the output back) and fill the
pool's padding heads. Zero lanes add nothing to a score
(``scale`` is passed explicitly, never derived from the pool), and the padded
lanes of values only produce output lanes that are cut off. Attention groups
the query heads by the model's KV-head count and reads only the pool's first
``num_kv_heads`` heads, so the padding heads cost memory but no compute.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

TPU_LANES = 128


def tpu_row_major_heads(num_kv_heads: int) -> bool:
    """Whether XLA keeps a packed (bfloat16) TPU pool with this many KV heads
    row-major: 2, 4 or a multiple of 8 (compiled for v5e; see the module note)."""
    return num_kv_heads >= 2 and (8 % num_kv_heads == 0 or num_kv_heads % 8 == 0)


def pool_kv_heads(num_kv_heads: int, platform: str, dtype) -> int:
    """The pool's KV-head count for a model's ``num_kv_heads`` on ``platform``
    in ``dtype``: on TPU in a packed dtype the smallest count at least the
    model's that XLA keeps row-major (the rest padding heads), else the model's."""
    if num_kv_heads < 1:
        raise ValueError(f"num_kv_heads: {num_kv_heads}, must be at least 1")
    if platform != "tpu" or jnp.dtype(dtype).itemsize >= 4:
        return num_kv_heads
    heads = num_kv_heads
    while not tpu_row_major_heads(heads):
        heads += 1
    return heads


def pool_head_dim(head_dim: int, platform: str) -> int:
    """The pool's last dimension for a model's ``head_dim`` on ``platform``."""
    if platform == "tpu":
        return -(-head_dim // TPU_LANES) * TPU_LANES
    return head_dim


def _pad_last(x: jax.Array, size: int) -> jax.Array:
    if size < x.shape[-1]:
        raise ValueError(f"head_dim: {x.shape[-1]} is larger than the KV pool's {size}")
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def _pad_heads(x: jax.Array, pool_heads: int) -> jax.Array:
    """Keys/values ``[T, H, D]`` for a pool of ``pool_heads`` >= H heads: pool
    head ``i`` is head ``i % H`` (the padding heads copy the first ones)."""
    heads = x.shape[1]
    if pool_heads < heads:
        raise ValueError(f"num_kv_heads: {heads} KV heads do not fit the KV pool's {pool_heads}")
    return jnp.tile(x, (1, -(-pool_heads // heads), 1))[:, :pool_heads]


def _model_kv_heads(num_q_heads: int, pool_heads: int, num_kv_heads: int | None) -> int:
    """The model's KV-head count given to attention (None: the pool's), checked
    against the pool and the query heads (a ValueError naming the field)."""
    heads = pool_heads if num_kv_heads is None else int(num_kv_heads)
    if not 1 <= heads <= pool_heads:
        raise ValueError(f"num_kv_heads: {heads} KV heads, the KV pool has {pool_heads}")
    if num_q_heads % heads:
        raise ValueError(f"num_heads: {num_q_heads} query heads do not divide among "
                         f"{heads} KV heads")
    return heads


def pads_queries(attend: Callable) -> Callable:
    """Wrap ``attend(q, cache, layer, meta, *, num_kv_heads, **kw)``: queries
    are padded to the pool's head dimension (the output cut back to q's), and
    ``num_kv_heads`` (the model's KV heads, None: the pool's) is checked and
    always passed on, so ``attend`` groups the query heads by it and reads only
    the pool's first ``num_kv_heads`` heads."""
    @functools.wraps(attend)
    def wrapper(q, cache, layer, meta, *, num_kv_heads: int | None = None, **kw):
        head_dim = q.shape[-1]
        heads = _model_kv_heads(q.shape[1], cache.shape[4], num_kv_heads)
        if head_dim != cache.shape[-1]:
            q = _pad_last(q, cache.shape[-1])
        out = attend(q, cache, layer, meta, num_kv_heads=heads, **kw)
        return out[..., :head_dim]
    return wrapper


def pads_rows(write: Callable) -> Callable:
    """Wrap ``write(cache, layer, k, v, slot_mapping, **kw)``: keys and values
    are padded to the pool's head dimension (zeros) and KV-head count (copies
    of their heads, `_pad_heads`)."""
    @functools.wraps(write)
    def wrapper(cache, layer, k, v, slot_mapping, **kw):
        size = cache.shape[-1]
        if k.shape[-1] != size:
            k, v = _pad_last(k, size), _pad_last(v, size)
        if k.shape[1] != cache.shape[4]:
            k, v = _pad_heads(k, cache.shape[4]), _pad_heads(v, cache.shape[4])
        return write(cache, layer, k, v, slot_mapping, **kw)
    return wrapper
