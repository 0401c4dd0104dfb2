"""Live migration, engine side: the source and destination halves of moving a
running request (its KV blocks and all of its state) to another engine.

A migration driver (`sluice.scheduler.migration`) calls these between engine
steps, on each engine's own thread:

source (the request keeps decoding between calls)::

    chunk = src.export_kv(rid, first_block, epoch)  # full blocks not yet copied
    handover = src.suspend(rid, first_block, epoch)  # stop: the rest + request state
    src.release(rid)   # after the destination adopted it (frees the blocks)
    src.resume(rid)    # or: the destination refused, decode here again

destination::

    dst.import_kv(rid, chunk)   # reserves blocks as it goes; False = no room
    dst.adopt(handover)         # True = it runs here from the next step
    dst.cancel(rid)             # drop a reservation of a migration that aborted

``epoch`` is the request's preemption count when the migration began: a
request preempted meanwhile (recompute may rewrite its KV, a swap moves it)
fails every later call, and the driver aborts. Only requests that are running,
alone in their group (``n == 1``) and not swapped out can move. Full blocks
never change once written, so a block copied in an early stage stays valid;
the stop-and-copy stage moves only the blocks filled since, plus the partial
last one, which bounds the pause (downtime) to a few blocks whatever the length.

Sampling state needs no copying: a request's randomness is derived from its
seed and step (`sluice.runtime.sampler`), and the detokenizer (with its
stop-string buffer) travels inside the request.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import jax
import numpy as np

from sluice.runtime.block_manager import contiguous_runs
from sluice.runtime.model_runner import COPY_CHUNK_BLOCKS
from sluice.runtime.request import Request, RequestStatus

if TYPE_CHECKING:
    from sluice.runtime.engine import LLMEngine
    from sluice.runtime.intake import Group


# Blocks per copy: every chunk is staged in a buffer of this many rows, so each
# device compiles one gather and one scatter for migration, whatever the lengths.
CHUNK_BLOCKS = COPY_CHUNK_BLOCKS


@dataclasses.dataclass
class KVChunk:
    """Blocks ``first_block .. first_block + num_blocks - 1`` of a request's table;
    ``blocks`` may have padding rows past ``num_blocks``."""

    first_block: int
    blocks: np.ndarray | jax.Array  # [>= num_blocks, layers, 2, block_size, kv_heads, head_dim]
    num_blocks: int

    @property
    def nbytes(self) -> int:
        return int(self.blocks.nbytes // max(1, self.blocks.shape[0]) * self.num_blocks)

    def to_host(self) -> KVChunk:
        """The chunk in host memory without padding (to leave the process)."""
        return KVChunk(self.first_block, np.asarray(self.blocks[:self.num_blocks]),
                       self.num_blocks)


@dataclasses.dataclass
class Handover:
    """Everything the destination needs to continue a request."""

    group: Group
    num_computed_tokens: int
    tail: list[KVChunk]  # the blocks not copied before the stop
    suspended_at: float  # time.monotonic() on the source, to measure downtime

    @property
    def request(self) -> Request:
        return self.group.requests[0]


class MigrationEndpoint:
    """Both halves of live migration for one engine (see the module docstring)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._suspended: dict[str, tuple[Request, int]] = {}  # id -> (request, running index)
        self.num_out = 0  # requests handed to another engine
        self.num_in = 0  # requests adopted from another engine

    # -- source ---------------------------------------------------------------

    def migratable(self) -> list[Request]:
        """Running requests that could move now, in admission order."""
        return [r for r in self.engine.scheduler.running if self._movable(r)]

    def epoch(self, request_id: str) -> int | None:
        """The preemption count to pass to later calls; None if it cannot move."""
        req = self._running(request_id)
        return req.num_preemptions if req is not None and self._movable(req) else None

    def export_kv(self, request_id: str, first_block: int, epoch: int) -> KVChunk | None:
        """The request's next full blocks from ``first_block`` on (up to
        `CHUNK_BLOCKS`, possibly none), on this engine's device; None if it is no
        longer running here as of ``epoch``."""
        req = self._running(request_id)
        if req is None or req.num_preemptions != epoch:
            return None
        num_full = req.num_computed_tokens // self.engine.block_manager.block_size
        return self._chunk(request_id, first_block, max(first_block, num_full))

    def suspend(self, request_id: str, first_block: int, epoch: int) -> Handover | None:
        """Stop scheduling the request and hand over its state and remaining KV;
        its blocks stay allocated until `release` or `resume`."""
        req = self._running(request_id)
        if req is None or req.num_preemptions != epoch:
            return None
        suspended_at = time.monotonic()
        bs = self.engine.block_manager.block_size
        end = -(-req.num_computed_tokens // bs)
        tail = [self._chunk(request_id, first, end)
                for first in range(first_block, end, CHUNK_BLOCKS)]
        index = self.engine.scheduler.running.index(req)
        self.engine.scheduler.detach(req)
        self._suspended[request_id] = (req, index)
        return Handover(self.engine.groups[req.parent_id], req.num_computed_tokens, tail,
                        suspended_at)

    def release(self, request_id: str) -> None:
        """The destination took over: free the blocks and forget the request."""
        if self._suspended.pop(request_id, None) is None:
            return
        self.engine.block_manager.free(request_id)
        if self.engine.groups.pop(request_id, None) is not None:
            self.num_out += 1

    def forget(self, request_id: str) -> None:
        """The client aborted a suspended request: free its blocks; a later
        `release` or `resume` for it is a no-op."""
        if self._suspended.pop(request_id, None) is not None:
            self.engine.block_manager.free(request_id)

    def resume(self, request_id: str) -> bool:
        """The migration aborted after `suspend`: run the request here again.
        False if it was aborted by its client meanwhile."""
        entry = self._suspended.pop(request_id, None)
        if entry is None or request_id not in self.engine.groups:
            return False
        req, index = entry
        self.engine.scheduler.attach(req, index)
        return True

    # -- destination ----------------------------------------------------------

    def import_kv(self, request_id: str, chunk: KVChunk) -> bool:
        """Reserve blocks for the chunk and write it; False (reserving nothing
        more) if the pool cannot hold it."""
        if request_id in self.engine.groups:
            raise ValueError(f"request_id: {request_id!r} is already served here")
        bm = self.engine.block_manager
        if request_id not in bm:
            bm.begin(request_id, [])
        end = chunk.first_block + chunk.num_blocks
        if not bm.allocate_slots(request_id, end * bm.block_size):
            return False
        if chunk.num_blocks:
            table = bm.block_table(request_id)[chunk.first_block:end]
            self.engine.runner.copy_in(list(contiguous_runs(table)), chunk.blocks, CHUNK_BLOCKS)
        return True

    def adopt(self, handover: Handover) -> bool:
        """Take the request over; False (and nothing kept) if its blocks do not fit."""
        rid = handover.request.request_id
        req = handover.request
        # The empty chunk registers the sequence even when nothing is left to copy.
        if not all(self.import_kv(rid, chunk) for chunk in [self._empty(0), *handover.tail]):
            self.cancel(rid)
            return False
        # The copy is asynchronous; wait for it, so the measured downtime is the
        # real pause and the request's first step here never waits on it.
        jax.block_until_ready(self.engine.runner.kv_cache)
        req.detokenizer.bind(self.engine.model.tokenizer)
        self.engine.block_manager.commit(req.request_id, req.all_token_ids,
                                         handover.num_computed_tokens)
        self.engine.groups[handover.group.request_id] = handover.group
        self.engine.scheduler.attach(req)
        self.num_in += 1
        return True

    def cancel(self, request_id: str) -> None:
        """Free blocks reserved by `import_kv` for a migration that will not land."""
        if request_id not in self.engine.groups:
            self.engine.block_manager.free(request_id)

    # -- helpers --------------------------------------------------------------

    def _running(self, request_id: str) -> Request | None:
        group = self.engine.groups.get(request_id)
        if group is None or len(group.requests) != 1:
            return None
        req = group.requests[0]
        ok = req.status is RequestStatus.RUNNING and request_id not in self._suspended
        return req if ok and req in self.engine.scheduler.running else None

    def _movable(self, req: Request) -> bool:
        group = self.engine.groups.get(req.parent_id)
        return (group is not None and len(group.requests) == 1 and not req.swapped_out
                and req.request_id not in self._suspended)

    def _chunk(self, request_id: str, first: int, end: int) -> KVChunk:
        """Blocks ``first`` up to ``end`` (at most `CHUNK_BLOCKS`) of the table."""
        table = self.engine.block_manager.block_table(request_id)[first:end][:CHUNK_BLOCKS]
        if not table:
            return self._empty(first)
        blocks = self.engine.runner.gather(list(contiguous_runs(table)), CHUNK_BLOCKS)
        return KVChunk(first, blocks, len(table))

    def _empty(self, first: int) -> KVChunk:
        spec = self.engine.runner.spec
        return KVChunk(first, np.zeros((0,) + spec.shape[1:], spec.dtype), 0)
