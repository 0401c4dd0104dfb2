"""Live migration, engine side: the source and destination halves of moving a
running request (its KV blocks and all of its state) to another engine.

A migration driver (`sluice.scheduler.migration`) calls these between engine
steps, on each engine's own thread:

source (the request keeps decoding between calls)::

    chunks = src.export_kv(rid, first_blocks, epoch)  # full blocks not yet copied
    handover = src.suspend(rid, first_blocks, epoch)  # stop: the rest + request state
    src.release(rid)   # after the destination adopted it (frees the blocks)
    src.resume(rid)    # or: the destination refused, decode here again

destination::

    dst.import_kv(rid, chunks)  # reserves blocks as it goes; False = no room
    dst.adopt(handover)         # True = it runs here from the next step
    dst.cancel(rid)             # drop a reservation of a migration that aborted

The unit that moves is a user request: a `Group` of ``n`` sibling sequences
(``n > 1`` for parallel sampling), named by its request id; its outputs are
built from all siblings, so they move together. A group can move when each of
its unfinished siblings is running here and not swapped out. Chunks carry the
sibling's id (``seq_id``); ``first_blocks`` maps each sibling to the blocks
already copied. ``epoch`` (`Epoch`) holds the siblings' preemption counts when
the migration began: a sibling preempted meanwhile (recompute may rewrite its
KV, a swap moves it), or one that finished, fails every later call, and the
driver aborts. It also holds a probe, an empty chunk per sibling in the
source pool's block layout: the driver imports it first, so a destination
whose pool differs (layers, block size, KV heads, head_dim, dtype: another
model, or a platform that pads heads differently) refuses before anything is
copied; `import_kv` checks every chunk's layout before reserving blocks for
it. Full blocks never change once written, so a block copied in an early
stage stays valid; the stop-and-copy stage moves only the blocks filled since,
plus the partial last one, which bounds the pause (downtime) to a few blocks
per sibling whatever the length.

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
from sluice.runtime.kv_cache import blocks_for
from sluice.runtime.model_runner import COPY_CHUNK_BLOCKS, ModelRunner
from sluice.runtime.request import Request

if TYPE_CHECKING:
    from sluice.runtime.intake import Group
    from sluice.runtime.structured_output import StructuredOutputManager
    from sluice.runtime.tokenizer import Tokenizer
    from sluice.scheduler.local import LocalScheduler


# Blocks per copy: every chunk is staged in a buffer of this many rows, so each
# device compiles one gather and one scatter for migration, whatever the lengths.
CHUNK_BLOCKS = COPY_CHUNK_BLOCKS


class PoolMismatch(ValueError):
    """The source's KV blocks do not fit this pool (another layout: layers, block
    size, KV heads, head_dim or dtype); no request can move between the two."""


@dataclasses.dataclass(frozen=True)
class KVChunk:
    """Blocks ``first_block .. first_block + num_blocks - 1`` of sibling
    ``seq_id``'s table; ``blocks`` may have padding rows past ``num_blocks``."""

    seq_id: str
    first_block: int
    blocks: np.ndarray | jax.Array  # [>= num_blocks, layers, 2, block_size, kv_heads, head_dim]
    num_blocks: int

    @property
    def nbytes(self) -> int:
        return int(self.blocks.nbytes // max(1, self.blocks.shape[0]) * self.num_blocks)

    def to_host(self) -> KVChunk:
        """The chunk in host memory without padding (to leave the process)."""
        return KVChunk(self.seq_id, self.first_block, np.asarray(self.blocks[:self.num_blocks]),
                       self.num_blocks)


@dataclasses.dataclass(frozen=True, eq=False)
class Epoch:
    """Where a migration began (`MigrationEndpoint.epoch`)."""

    siblings: tuple[tuple[str, int], ...]  # (sibling id, preemption count) of the moving ones
    probe: tuple[KVChunk, ...]  # an empty chunk per sibling, in the source pool's layout


def _block_layout(shape: tuple[int, ...], dtype) -> str:
    """A block's ``[layers, 2, block_size, kv_heads, head_dim]`` shape and dtype, named."""
    layers, _, block_size, kv_heads, head_dim = shape
    return (f"layers={layers}, block_size={block_size}, kv_heads={kv_heads}, "
            f"head_dim={head_dim}, dtype={np.dtype(dtype).name}")


@dataclasses.dataclass
class Handover:
    """Everything the destination needs to continue a group."""

    group: Group
    num_computed_tokens: dict[str, int]  # per moving sibling (the unfinished ones)
    tail: list[KVChunk]  # the blocks not copied before the stop
    suspended_at: float  # time.monotonic() on the source, to measure downtime


class MigrationEndpoint:
    """Both halves of live migration for one engine (see the module docstring).

    It sees the engine through five parts: the scheduler (which requests run,
    ``detach``/``attach``, and the KV blocks: ``reserve_blocks``,
    ``free_blocks``, tables through its KV manager), the model runner's block
    mover (``gather``/``copy_in``), the engine's groups by id, the
    tokenizer (adopted requests' detokenizers bind to it) and the structured-output
    manager (it tracks adopted constrained requests, to mask their rows)."""

    def __init__(self, scheduler: LocalScheduler, runner: ModelRunner,
                 groups: dict[str, Group], tokenizer: Tokenizer,
                 structured: StructuredOutputManager):
        self.scheduler, self.runner = scheduler, runner
        self.groups, self.tokenizer = groups, tokenizer
        self.structured = structured
        # group id -> its suspended siblings and their places in the running list
        self._suspended: dict[str, list[tuple[Request, int]]] = {}
        self._incoming: dict[str, set[str]] = {}  # group id -> siblings with reserved blocks
        self.num_out = 0  # groups handed to another engine
        self.num_in = 0  # groups adopted from another engine

    # -- source ---------------------------------------------------------------

    def migratable(self) -> list[tuple[str, int]]:
        """(group id, tokens to move) of the groups that could move now, in
        admission order."""
        out: dict[str, int] = {}
        seen: set[str] = set()
        for r in self.scheduler.running:
            if r.parent_id in seen:
                continue
            seen.add(r.parent_id)
            live = self._moving(r.parent_id)
            if live is not None:
                out[r.parent_id] = sum(s.num_tokens for s in live)
        return list(out.items())

    def epoch(self, group_id: str) -> Epoch | None:
        """What to pass to later calls; None if the group cannot move."""
        live = self._moving(group_id)
        if live is None:
            return None
        return Epoch(_siblings(live), tuple(self._empty(r.request_id, 0) for r in live))

    def export_kv(self, group_id: str, first_blocks: dict[str, int],
                  epoch: Epoch) -> list[KVChunk] | None:
        """Each moving sibling's next full blocks from ``first_blocks`` on (up to
        `CHUNK_BLOCKS`, possibly none), on this engine's device; None if the
        group no longer runs here as of ``epoch``."""
        live = self._current(group_id, epoch)
        if live is None:
            return None
        size = self.scheduler.kv.block_size
        chunks = []
        for r in live:
            first = first_blocks.get(r.request_id, 0)
            chunks.append(self._chunk(r.request_id, first,
                                      max(first, r.num_computed_tokens // size)))
        return chunks

    def suspend(self, group_id: str, first_blocks: dict[str, int],
                epoch: Epoch) -> Handover | None:
        """Stop scheduling the group and hand over its state and remaining KV;
        its blocks stay allocated until `release` or `resume`."""
        live = self._current(group_id, epoch)
        if live is None:
            return None
        suspended_at = time.monotonic()
        size = self.scheduler.kv.block_size
        tail, computed = [], {}
        for r in live:
            end = blocks_for(r.num_computed_tokens, size)
            tail += [self._chunk(r.request_id, first, end)
                     for first in range(first_blocks.get(r.request_id, 0), end, CHUNK_BLOCKS)]
            computed[r.request_id] = r.num_computed_tokens
        running = self.scheduler.running
        places = [(r, running.index(r)) for r in live]
        for r in live:
            self.scheduler.detach(r)
        self._suspended[group_id] = places
        return Handover(self.groups[group_id], computed, tail, suspended_at)

    def release(self, group_id: str) -> None:
        """The destination took over: free the blocks and forget the group."""
        places = self._suspended.pop(group_id, None)
        if places is None:
            return
        for r, _ in places:
            self.scheduler.free_blocks(r.request_id)
        if self.groups.pop(group_id, None) is not None:
            self.num_out += 1

    def forget(self, group_id: str) -> None:
        """The client aborted a suspended group: free its blocks; a later
        `release` or `resume` for it is a no-op."""
        for r, _ in self._suspended.pop(group_id, ()):
            self.scheduler.free_blocks(r.request_id)

    def resume(self, group_id: str) -> bool:
        """The migration aborted after `suspend`: run the group here again.
        False if it was aborted by its client meanwhile."""
        places = self._suspended.pop(group_id, None)
        if places is None or group_id not in self.groups:
            return False
        for r, index in sorted(places, key=lambda p: p[1]):  # back where each was
            self.scheduler.attach(r, index)
        return True

    # -- destination ----------------------------------------------------------

    def import_kv(self, group_id: str, chunks: list[KVChunk]) -> bool:
        """Reserve blocks for the chunks and write them; False (reserving nothing
        more) if the pool cannot hold them. Raises ``ValueError``, reserving
        nothing, if a chunk's blocks are not laid out as this pool's."""
        if group_id in self.groups:
            raise ValueError(f"request_id: {group_id!r} is already served here")
        for chunk in chunks:
            self._check_layout(chunk)
        reserved = self._incoming.setdefault(group_id, set())
        for chunk in chunks:
            reserved.add(chunk.seq_id)
            table = self.scheduler.reserve_blocks(chunk.seq_id,
                                                  chunk.first_block + chunk.num_blocks)
            if table is None:
                return False
            if chunk.num_blocks:
                self.runner.copy_in(list(contiguous_runs(table[chunk.first_block:])),
                                    chunk.blocks, CHUNK_BLOCKS)
        return True

    def adopt(self, handover: Handover) -> bool:
        """Take the group over; False (and nothing kept) if its blocks do not fit."""
        group = handover.group
        # Empty chunks register every sibling even when nothing is left to copy.
        empty = [self._empty(sid, 0) for sid in handover.num_computed_tokens]
        if not self.import_kv(group.request_id, empty + handover.tail):
            self.cancel(group.request_id)
            return False
        # The copy is asynchronous; wait for it, so the measured downtime is the
        # real pause and the group's first step here never waits on it.
        jax.block_until_ready(self.runner.kv_cache)
        for req in group.requests:
            req.detokenizer.bind(self.tokenizer)
        del self._incoming[group.request_id]
        self.groups[group.request_id] = group
        self.structured.admit(group.requests)
        for req in group.requests:
            if req.request_id in handover.num_computed_tokens:
                self.scheduler.attach(req, num_computed_tokens=handover.num_computed_tokens[
                    req.request_id])
        self.num_in += 1
        return True

    def cancel(self, group_id: str) -> None:
        """Free blocks reserved by `import_kv` for a migration that will not land."""
        for seq_id in self._incoming.pop(group_id, ()):
            self.scheduler.free_blocks(seq_id)

    # -- helpers --------------------------------------------------------------

    def _moving(self, group_id: str) -> list[Request] | None:
        """The group's unfinished siblings if every one of them runs here and
        could move now; else None."""
        group = self.groups.get(group_id)
        if group is None or group_id in self._suspended:
            return None
        live = [r for r in group.requests if not r.is_finished]
        if not live or not all(self.scheduler.movable(r) for r in live):
            return None
        return live

    def _current(self, group_id: str, epoch: Epoch) -> list[Request] | None:
        """The moving siblings, if the group is as it was at ``epoch``."""
        live = self._moving(group_id)
        if live is None or _siblings(live) != epoch.siblings:
            return None
        return live

    def _check_layout(self, chunk: KVChunk) -> None:
        """Raise `PoolMismatch` if the chunk's blocks do not fit this pool."""
        spec = self.runner.spec
        shape, dtype = tuple(chunk.blocks.shape[1:]), np.dtype(chunk.blocks.dtype)
        if shape != spec.shape[1:] or dtype != np.dtype(spec.dtype):
            raise PoolMismatch(f"kv_blocks: the KV pools differ: the source's blocks are "
                             f"{_block_layout(shape, dtype)}; this pool's are "
                             f"{_block_layout(spec.shape[1:], spec.dtype)}")

    def _chunk(self, seq_id: str, first: int, end: int) -> KVChunk:
        """Blocks ``first`` up to ``end`` (at most `CHUNK_BLOCKS`) of the table."""
        table = self.scheduler.kv.block_table(seq_id)[first:end][:CHUNK_BLOCKS]
        if not table:
            return self._empty(seq_id, first)
        blocks = self.runner.gather(list(contiguous_runs(table)), CHUNK_BLOCKS)
        return KVChunk(seq_id, first, blocks, len(table))

    def _empty(self, seq_id: str, first: int) -> KVChunk:
        spec = self.runner.spec
        return KVChunk(seq_id, first, np.zeros((0,) + spec.shape[1:], spec.dtype), 0)


def _siblings(live: list[Request]) -> tuple[tuple[str, int], ...]:
    """(id, preemption count) of each moving sibling: what `Epoch` pins."""
    return tuple((r.request_id, r.num_preemptions) for r in live)
