"""Live migration driver: move one running request (with all its ``n``
completions) between two instances.

Multi-stage copy (the request keeps decoding on the source meanwhile): each
stage exports the source's next full blocks not yet copied, per completion (at
most `sluice.runtime.migration.CHUNK_BLOCKS` each), and imports them on the
destination, which reserves blocks as they arrive. When a stage moved at most
``stop_blocks`` blocks, the next would be as short, so the driver stops the
request (``suspend``), copies the rest (the blocks filled since, plus the
partial last ones) with the request state, and the destination adopts it. The
pause -- suspend to adopt -- covers a few blocks whatever the sequence length.

Before anything is copied, the destination checks that the source's blocks
fit its pool (the epoch's probe: layers, block size, KV heads, head_dim,
dtype); instances of another model or platform refuse, with a reason naming
both layouts, and the request keeps running on its source.

Any failure (the request finished, was aborted or preempted; the pools differ;
the destination ran out of blocks; an instance died) aborts cleanly: the
destination drops its reservation and a suspended request resumes on the
source. ``max_stages=0``
gives a blocking copy (stop first, then copy everything), the baseline live
migration is measured against.
"""

from __future__ import annotations

import dataclasses
import time

from sluice.runtime.migration import KVChunk, PoolMismatch
from sluice.scheduler.instance import Instance


@dataclasses.dataclass
class MigrationResult:
    request_id: str
    source: str
    destination: str
    ok: bool
    reason: str  # "migrated", "not movable", "gone", "no room", or the error
    stages: int = 0
    blocks_copied: int = 0
    bytes_copied: int = 0
    downtime_s: float = 0.0  # the request's pause: suspend on the source to adopt
    duration_s: float = 0.0
    incompatible: bool = False  # the pools differ: no request can move from source to destination


def migrate(src: Instance, dst: Instance, request_id: str, *, max_stages: int = 64,
            stop_blocks: int = 2) -> MigrationResult:
    """Move ``request_id`` from ``src`` to ``dst`` (blocking; see the module docstring)."""
    result = MigrationResult(request_id, src.name, dst.name, False, "")
    start = time.monotonic()
    try:
        result.reason = _run(src, dst, request_id, max_stages, stop_blocks, result)
    except Exception as error:  # an instance died or a copy failed
        if not result.ok:  # after the adoption only the source's release can fail
            result.reason = f"{type(error).__name__}: {error}"
            result.incompatible = isinstance(error, PoolMismatch)
            _undo(src, dst, request_id)
    result.duration_s = time.monotonic() - start
    return result


def _run(src: Instance, dst: Instance, rid: str, max_stages: int, stop_blocks: int,
         result: MigrationResult) -> str:
    epoch = src.epoch(rid).result()
    if epoch is None:
        return "not movable"
    if not _imported(dst, rid, list(epoch.probe)):  # raises if the pools differ: nothing copied
        return "no room"
    copied: dict[str, int] = {}  # sibling -> blocks copied so far
    for _ in range(max_stages):
        chunks = src.export_kv(rid, copied, epoch).result()
        if chunks is None:
            dst.cancel(rid).result()
            return "gone"
        if not _imported(dst, rid, chunks):
            return "no room"
        moved = sum(c.num_blocks for c in chunks)
        result.stages += 1
        result.blocks_copied += moved
        result.bytes_copied += sum(c.nbytes for c in chunks)
        copied.update((c.seq_id, c.first_block + c.num_blocks) for c in chunks)
        if moved <= stop_blocks:
            break
    handover = src.suspend(rid, copied, epoch).result()
    if handover is None:
        dst.cancel(rid).result()
        return "gone"
    adopted = dst.adopt(handover).result()
    result.downtime_s = time.monotonic() - handover.suspended_at
    if not adopted:
        src.resume(rid).result()
        return "no room at stop"
    result.ok = True  # the destination runs it now, whatever happens to the source
    result.stages += 1
    result.blocks_copied += sum(c.num_blocks for c in handover.tail)
    result.bytes_copied += sum(c.nbytes for c in handover.tail)
    src.release(rid).result()
    return "migrated"


def _imported(dst: Instance, rid: str, chunks: list[KVChunk]) -> bool:
    """Whether the destination took the chunks; if not, it drops its reservation."""
    if dst.import_kv(rid, chunks).result():
        return True
    dst.cancel(rid).result()
    return False


def _undo(src: Instance, dst: Instance, rid: str) -> None:
    """Best-effort cleanup after an error; a dead side needs none (the cluster
    re-dispatches what a dead instance owned)."""
    for call in (lambda: dst.cancel(rid), lambda: src.resume(rid)):
        try:
            call().result()
        except Exception:  # that side is dead
            pass
