"""Sizing and allocation of the device-resident paged KV pool, and the block
arithmetic (`blocks_for`) the rest of the runtime uses.

One array per model, ``[num_blocks, num_layers, 2, block_size, num_kv_heads,
head_dim]``: block-major, so a block's keys and values for all layers are one
contiguous slab (a unit for swap and migration copies).

Token-major inside a page (``block_size`` before ``num_kv_heads``) suits the
TPU, where the last two dimensions are tiled and bfloat16 packs two rows per
sublane, so a DMA may index only the leading dimensions at arbitrary offsets:
writing one token's keys is a DMA to ``[block, layer, kv, offset]`` (a
head-major page would need an offset along the tiled token axis, i.e. a
read-modify-write of a 16-row group), and attention fetches a page for all
KV heads at once and separates heads in VMEM.

The pool's ``head_dim`` is the model's, padded where the kernels of the
device's platform need it (`pool_layout.pool_head_dim`: to a multiple of 128
on TPU, so XLA's default layout of the pool is the row-major one the Mosaic
kernels take and the pool is never copied around them), and so is its KV-head
count (`pool_layout.pool_kv_heads`: a bfloat16 TPU pool pads 1 KV head to 2,
SmolLM2's 3 to 4, for the same reason); the kernels take q/k/v at the model's
``head_dim`` and head counts, attention told the model's KV-head count
(``num_kv_heads``). Sizes (`bytes_per_block`) include the padding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sluice.pallas_kernels.pool_layout import pool_head_dim, pool_kv_heads
from sluice.runtime.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class KVCacheSpec:
    num_blocks: int
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32

    @classmethod
    def for_model(cls, cfg: ModelConfig, num_blocks: int, block_size: int = 16,
                  dtype=jnp.float32, device: jax.Device | None = None) -> "KVCacheSpec":
        """The pool of ``cfg`` for ``device`` (None: the default backend's)."""
        platform = device.platform if device is not None else jax.default_backend()
        return cls(num_blocks, block_size, cfg.num_layers,
                   pool_kv_heads(cfg.num_kv_heads, platform, dtype),
                   pool_head_dim(cfg.head_dim, platform), jnp.dtype(dtype))

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_blocks, self.num_layers, 2, self.block_size, self.num_kv_heads,
                self.head_dim)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def bytes_per_block(self) -> int:
        return int(np.prod(self.shape[1:])) * jnp.dtype(self.dtype).itemsize

    def allocate(self, device: jax.Device | None = None) -> jax.Array:
        return jax.device_put(jnp.zeros(self.shape, self.dtype), device)


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` tokens (the last one possibly partial):
    the one block-arithmetic formula of the runtime."""
    return -(-num_tokens // block_size)


def num_blocks_for_budget(cfg: ModelConfig, budget_bytes: int, block_size: int = 16,
                          dtype=jnp.float32, device: jax.Device | None = None) -> int:
    """How many blocks fit in ``budget_bytes`` on ``device``; raises if not even one does."""
    per_block = KVCacheSpec.for_model(cfg, 1, block_size, dtype, device).bytes_per_block
    n = int(budget_bytes // per_block)
    if n < 1:
        raise ValueError(f"kv_cache_memory: {budget_bytes} bytes is less than one block "
                         f"({per_block} bytes)")
    return n
