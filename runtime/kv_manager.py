"""The KV cache of one instance: device blocks, host swap space, and which host
blocks hold copies of each request's KV.

`KVCacheManager` is owned by the per-instance scheduler
(`sluice.scheduler.local.LocalScheduler`) and mutated only by it; everyone
else (the engine's stats, the load report, live migration) reads it or asks
the scheduler. It puts together:

- the device pool's bookkeeping (`BlockManager`: block tables, reference
  counts, prefix cache), through ``begin``, ``allocate``, ``commit``,
  ``truncate``, ``free``, ``block_table`` and the read-only ``blocks``;
- the host swap space (`HostSwapSpace`, bookkeeping only; `SwapExecutor` moves
  the data) and, per request, the host blocks holding valid copies of its first
  blocks (``host_blocks``) and whether its KV lives only there while it waits
  (``is_swapped``);
- the copies one step needs (``swap_out``, ``swap_in`` as `SwapCopy` =
  ``(request id, device runs, host blocks)``, and the host references to drop
  after them), collected while the scheduler decides and taken by
  ``take_copies``.

Block arithmetic is stated once: `blocks_for` (blocks holding ``n`` tokens)
and `blocks_to_start` (what a request needs to start: its tokens plus the one
it generates next), which the scheduler's admission, the load report and the
global scheduler's placement all use.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sluice.runtime.block_manager import BlockManager, contiguous_runs
from sluice.runtime.kv_cache import blocks_for
from sluice.runtime.request import Request
from sluice.runtime.swap import HostSwapSpace, SwapCopy, SwapExecutor


def blocks_to_start(requests: Iterable[Request], block_size: int) -> int:
    """Blocks the requests need to start: each one's tokens plus the next one."""
    return sum(blocks_for(r.num_tokens + 1, block_size) for r in requests)


class KVCacheManager:
    """Device blocks, host copies and a step's copies of one instance (module docstring)."""

    def __init__(self, blocks: BlockManager, host: HostSwapSpace | None = None):
        self.blocks = blocks  # read-only outside this class
        self.host = host
        self.block_size = blocks.block_size
        self.swapper: SwapExecutor | None = None  # set by `configure_swap`
        self.preemption_mode = "swap"
        self.kv_reuse = False
        self._host: dict[str, list[int]] = {}  # request id -> host copies of its first blocks
        self._swapped: set[str] = set()  # waiting requests whose KV is in host memory only
        self._swap_out: list[SwapCopy] = []
        self._swap_in: list[SwapCopy] = []
        self._release: list[int] = []
        self._swapping_in: set[str] = set()  # ids with a copy-in this step

    def configure_swap(self, swapper: SwapExecutor, mode: str, kv_reuse: bool) -> None:
        self.swapper, self.preemption_mode, self.kv_reuse = swapper, mode, kv_reuse

    @property
    def overlap_swap_in(self) -> bool:
        return self.swapper is not None and self.swapper.asynchronous

    # -- reads ----------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free_blocks

    def block_table(self, request_id: str) -> list[int]:
        return self.blocks.block_table(request_id)

    def host_blocks(self, request_id: str) -> list[int]:
        """Host blocks holding copies of the request's first blocks (a copy)."""
        return list(self._host.get(request_id, ()))

    def is_swapped(self, request_id: str) -> bool:
        return request_id in self._swapped

    @property
    def num_swapped(self) -> int:
        return len(self._swapped)

    def blocks_to_admit(self, req: Request, budget: int) -> int:
        """New device blocks admitting ``req`` with ``budget`` tokens would take."""
        if self.is_swapped(req.request_id):  # all its blocks are new
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            return blocks_for(req.num_computed_tokens + n, self.block_size)
        key = self._prefix_key(req)
        cached = self.blocks.lookup_prefix(key)
        n = min(req.num_tokens - cached, budget)
        return self.blocks.admission_cost(key, cached + n)

    # -- device blocks --------------------------------------------------------

    def allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.blocks.allocate_slots(request_id, num_tokens)

    def commit(self, req: Request) -> None:
        """The request's first ``num_computed_tokens`` tokens have their KV written."""
        self.blocks.commit(req.request_id, req.all_token_ids, req.num_computed_tokens)

    def truncate(self, request_id: str, num_tokens: int) -> None:
        """Release the request's device blocks past those of its first
        ``num_tokens`` tokens (reserved for draft positions that were rejected)."""
        self.blocks.truncate(request_id, num_tokens)

    def free(self, request_id: str) -> None:
        """Free the request's device blocks (its host copies stay)."""
        self.blocks.free(request_id)

    def reserve(self, seq_id: str, num_blocks: int) -> list[int] | None:
        """Blocks for the first ``num_blocks`` blocks of a sequence whose KV comes
        from elsewhere (live migration): registered on first use, grown as
        needed; its table's first ``num_blocks`` ids, or None (nothing more
        reserved) if the pool cannot hold them."""
        if seq_id not in self.blocks:
            self.blocks.begin(seq_id, [])
        if not self.blocks.allocate_slots(seq_id, num_blocks * self.block_size):
            return None
        return self.blocks.block_table(seq_id)[:num_blocks]

    def begin(self, req: Request) -> tuple[int, list[int] | None]:
        """Register a (not swapped) request with the block manager: it takes
        prefix hits, then host copies that extend them (its own, kept from before
        a recompute preemption, or its conversation's previous turn). Returns the
        cached tokens and those host blocks (covering the table from block 0), or
        None. A swapped request starts on an empty table (`swap_in` fills it)."""
        if self.is_swapped(req.request_id):
            self.blocks.begin(req.request_id, [])
            return 0, None
        cached = self.blocks.begin(req.request_id, self._prefix_key(req))
        return cached, None if req.needs_prompt_logprobs else self._host_prefix(req, cached)

    @staticmethod
    def _prefix_key(req: Request) -> list[int]:
        """The tokens a request may find cached: none while it needs prompt
        log-probs (a cached token's logits are not kept), else all of them."""
        return [] if req.needs_prompt_logprobs else req.all_token_ids

    def _host_prefix(self, req: Request, cached: int) -> list[int] | None:
        if self.host is None:
            return None
        limit = (req.num_tokens - 1) // self.block_size  # one token must be computed
        host = self._host.get(req.request_id, [])[:limit]
        if not host and self.kv_reuse and req.conversation is not None:
            host = self.host.match(req.conversation, req.all_token_ids, limit)
        if len(host) * self.block_size <= cached:
            return None  # the device prefix cache has at least as much
        return host

    # -- host copies ----------------------------------------------------------

    def drop_host(self, request_id: str) -> None:
        """Release the request's host copies (it left, or its KV is recomputed)."""
        blocks = self._host.pop(request_id, None)
        if blocks:
            self.host.release(blocks)
        self._swapped.discard(request_id)

    def save_conversation(self, req: Request) -> None:
        """Keep a finished turn's full blocks in host memory under its conversation
        id, copying only the blocks not there already (the copy is issued now,
        before its device blocks are freed)."""
        if not (self.kv_reuse and self.swapper is not None and req.conversation is not None):
            self.drop_host(req.request_id)
            return
        table = self.blocks.block_table(req.request_id)
        full = min(req.num_computed_tokens // self.block_size, len(table))
        mine = self._host.pop(req.request_id, [])
        self._swapped.discard(req.request_id)
        keep = mine[:full]
        self.host.release(mine[full:])
        host = self.host.reserve(full - len(keep))
        if host is None:  # no room for the rest: keep the part already in host memory
            host = []
        elif host:
            self.swapper.copy_out(list(contiguous_runs(table[len(keep):full])), host)
        self.host.remember(req.conversation, req.all_token_ids, keep + host)

    def swap_out(self, req: Request, donors: Sequence[Request]) -> bool:
        """Reserve host blocks for the request's computed KV and queue the copy of
        the blocks not already in host memory; False = recompute instead (no
        swap space, too little of it, or recompute estimated cheaper).
        ``donors``: requests whose host copies, kept only for reuse, may be
        taken on shortage, in that order."""
        n = blocks_for(req.num_computed_tokens, self.block_size)
        if self.host is None or n == 0:
            return False
        mine = self._host.get(req.request_id, [])
        keep = mine[:n]
        new = n - len(keep)
        if (self.preemption_mode == "auto" and self.swapper is not None
                and not self.swapper.cost.prefer_swap(new, n, req.num_computed_tokens)):
            return False
        host = self._reserve_host(new, req, donors)
        if host is None:  # swap space exhausted: recompute instead
            return False
        if new:
            table = self.blocks.block_table(req.request_id)
            self._swap_out.append((req.request_id, list(contiguous_runs(table[len(keep):n])),
                                   host))
        self.host.release(mine[n:])
        self._host[req.request_id] = keep + host
        self._swapped.add(req.request_id)
        return True

    def _reserve_host(self, n: int, req: Request, donors: Sequence[Request]
                      ) -> list[int] | None:
        """``n`` host blocks; on shortage, ``donors`` give up the host copies they
        keep only for reuse (not swapped ones, not ones being copied in this step)."""
        if n == 0:
            return []
        host = self.host.reserve(n)
        if host is not None:
            return host
        for other in donors:
            if host is not None:
                break
            rid = other.request_id
            if (other is req or not self._host.get(rid) or rid in self._swapping_in
                    or rid in self._swapped):
                continue
            self.host.release(self._host.pop(rid))
            host = self.host.reserve(n)
        return host

    def reuse_in(self, req: Request, host: list[int]) -> None:
        """Queue the copy-in of host blocks past the device prefix hits (the
        request's ``num_cached_tokens``)."""
        first = req.num_cached_tokens // self.block_size
        if not self._host.get(req.request_id):  # the conversation's blocks: take references
            self.host.retain(host)
            self._host[req.request_id] = list(host)
        table = self.blocks.block_table(req.request_id)[first:len(host)]
        self._swap_in.append((req.request_id, list(contiguous_runs(table)), host[first:]))
        self._swapping_in.add(req.request_id)

    def swap_in(self, req: Request) -> None:
        """Queue the copy-in of a swapped request's KV into its (new) blocks."""
        host = self._host[req.request_id]
        table = self.blocks.block_table(req.request_id)[:len(host)]
        self._swap_in.append((req.request_id, list(contiguous_runs(table)), host))
        self._swapping_in.add(req.request_id)
        self._swapped.discard(req.request_id)
        # Keep the host copies of full blocks (they never change) so a later swap-out
        # copies only new blocks; a partial last block will change. Without reuse, keep none.
        full = req.num_computed_tokens // self.block_size if self.kv_reuse else 0
        self._release.extend(host[full:])
        self._host[req.request_id] = host[:full]

    def swapping_in(self, request_id: str) -> bool:
        """Whether the request's KV is copied in during this step."""
        return request_id in self._swapping_in

    def take_copies(self) -> tuple[list[SwapCopy], list[SwapCopy], list[int]]:
        """This step's (swap-outs, swap-ins, host blocks to release after them);
        the next step starts with none."""
        out = self._swap_out, self._swap_in, self._release
        self._swap_out, self._swap_in, self._release = [], [], []
        self._swapping_in = set()
        return out

    def copy_in_failed(self, req: Request) -> None:
        """A swap-in of the request did not happen: its host copies, and its
        conversation's, are not trusted any more."""
        self.drop_host(req.request_id)
        if req.conversation is not None:
            self.host.forget(req.conversation)
