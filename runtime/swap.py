"""Host-memory swap space for preempted requests' KV blocks.

`HostSwapSpace` is a numpy pool of blocks shaped like the device pool's
(``[num_blocks, num_layers, 2, block_size, kv_heads, head_dim]``) with a free
list. The scheduler reserves and releases host blocks (bookkeeping only); the
engine moves the data with the model runner's block gather/scatter, staging
whole block groups at a time. Exhaustion is not an error: ``reserve`` returns
None and the scheduler falls back to recompute.
"""

from __future__ import annotations

import numpy as np

from sluice.runtime.kv_cache import KVCacheSpec


class HostSwapSpace:
    def __init__(self, spec: KVCacheSpec, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"swap_space: must hold at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = np.zeros((num_blocks,) + spec.shape[1:], np.dtype(spec.dtype))
        self._free = list(range(num_blocks - 1, -1, -1))

    @classmethod
    def for_budget(cls, spec: KVCacheSpec, budget_bytes: int) -> "HostSwapSpace":
        return cls(spec, int(budget_bytes // spec.bytes_per_block))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def reserve(self, n: int) -> list[int] | None:
        """``n`` host blocks, or None (nothing reserved) if too few are free."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def release(self, ids: list[int]) -> None:
        self._free.extend(reversed(ids))

    def store(self, ids: list[int], staging: np.ndarray) -> None:
        self.blocks[ids] = staging[:len(ids)]

    def load(self, ids: list[int]) -> np.ndarray:
        return self.blocks[ids]
