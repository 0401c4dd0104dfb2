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
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

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
                  dtype=jnp.float32) -> "KVCacheSpec":
        return cls(num_blocks, block_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                   jnp.dtype(dtype))

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
                          dtype=jnp.float32) -> int:
    """How many blocks fit in ``budget_bytes``; raises if not even one does."""
    per_block = KVCacheSpec.for_model(cfg, 1, block_size, dtype).bytes_per_block
    n = int(budget_bytes // per_block)
    if n < 1:
        raise ValueError(f"kv_cache_memory: {budget_bytes} bytes is less than one block "
                         f"({per_block} bytes)")
    return n
