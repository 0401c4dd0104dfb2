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

Not covered: in bfloat16 a pool with one KV head or an odd number of them
(``[.., 1, 256]``, ``[.., 3, 128]``) is still re-laid out by XLA (probed on
v5e), since a packed tile holds pairs of rows; such pools still copy on TPU.

Padding is invisible to callers: the implementations take q/k/v at the model's
``head_dim`` and are wrapped by `pads_queries` / `pads_rows`, which zero-pad
them to the pool's and slice the output back. Zero lanes add nothing to a
score (``scale`` is passed explicitly, never derived from the pool), and the
padded lanes of values only produce output lanes that are cut off.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

TPU_LANES = 128


def pool_head_dim(head_dim: int, platform: str) -> int:
    """The pool's last dimension for a model's ``head_dim`` on ``platform``."""
    if platform == "tpu":
        return -(-head_dim // TPU_LANES) * TPU_LANES
    return head_dim


def _pad_last(x: jax.Array, size: int) -> jax.Array:
    if size < x.shape[-1]:
        raise ValueError(f"head_dim: {x.shape[-1]} is larger than the KV pool's {size}")
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def pads_queries(attend: Callable) -> Callable:
    """Wrap ``attend(q, cache, layer, meta, **kw)``: queries are padded to the
    pool's head dimension and the output cut back to q's."""
    @functools.wraps(attend)
    def wrapper(q, cache, layer, meta, **kw):
        head_dim = q.shape[-1]
        if head_dim == cache.shape[-1]:
            return attend(q, cache, layer, meta, **kw)
        return attend(_pad_last(q, cache.shape[-1]), cache, layer, meta, **kw)[..., :head_dim]
    return wrapper


def pads_rows(write: Callable) -> Callable:
    """Wrap ``write(cache, layer, k, v, slot_mapping, **kw)``: keys and values
    are padded to the pool's head dimension."""
    @functools.wraps(write)
    def wrapper(cache, layer, k, v, slot_mapping, **kw):
        size = cache.shape[-1]
        if k.shape[-1] != size:
            k, v = _pad_last(k, size), _pad_last(v, size)
        return write(cache, layer, k, v, slot_mapping, **kw)
    return wrapper
