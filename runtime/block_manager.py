"""Host-side bookkeeping of the paged KV pool: which blocks each sequence owns.

The device pool is one block-major array ``[num_blocks, num_layers, 2,
block_size, kv_heads, head_dim]`` (see ``kv_cache.py``); this module only
decides which block ids a sequence's tokens live in. One instance's block
manager belongs to its KV cache manager (`sluice.runtime.kv_manager`), which
the per-instance scheduler owns: only they change it, others read it. It is
pure Python and is called by the scheduler every step, so every operation
costs time in the number of blocks it touches (plus a bisect over the free
runs), never a scan of the whole pool.

Lifecycle of a sequence (``seq_id`` is any hashable)::

    cached = bm.begin(seq_id, prompt)              # reuse cached prefix blocks
    bm.allocate_slots(seq_id, n)                   # room for the first n tokens
    ... the model writes KV of tokens[cached:n] ...
    bm.commit(seq_id, tokens, n)                   # those tokens' KV is written
    ... allocate_slots / commit again as decoding appends tokens ...
    bm.truncate(seq_id, n)                         # drop blocks reserved past n tokens
    bm.free(seq_id)                                # finished, aborted or preempted

``allocate_slots`` returns False and changes nothing when the pool cannot hold
the request, so the scheduler can preempt someone and retry. ``lookup_prefix``
answers "how many tokens would ``begin`` find cached" without touching state,
for admission decisions.

Every block is in exactly one of three states:

* free: in the free pool, holding nothing worth keeping;
* cached and evictable: referenced by no sequence but registered in the prefix
  cache, kept in least-recently-used order and reclaimed only on shortage;
* referenced: in the block table of one or more sequences (refcount >= 1).

``num_free_blocks`` counts the first two: both can be handed out.

Prefix caching. When a block becomes full and its KV is written (``commit``),
it is registered under a chained hash: SHA-256 of the parent block's hash and
the block's token ids, so equal hashes mean equal whole prefixes, not just
equal blocks. SHA-256 rather than Python's 64-bit ``hash`` because a hit is
trusted without comparing tokens: a collision would silently serve another
prompt's KV. ``begin`` walks a prompt's full blocks from the start and takes
every hit, but never the block holding the prompt's last token: at least one
token must be computed to produce logits. A hit shares the block (refcount++).

No copy-on-write is needed: only full blocks are ever registered, a full
block's KV is never written again (positions are append-only), and the last,
partial block of a sequence is never a hit, so every block a sequence writes
into is one it allocated itself and holds alone. If two sequences compute the
same block concurrently, the first to commit registers it and the other keeps
its private copy unregistered (it returns to the free pool when freed).

Contiguity. ``block_groups`` describes a table as maximal runs of consecutive
ids; in the block-major layout each run is a single slice of the pool, so swap
and migration copy one range per run. Allocation therefore keeps tables
contiguous: new blocks first extend the run right after the sequence's last
block, then come from the smallest free run that holds them all (best fit),
and only when no run is long enough from the longest runs available. The free
pool is kept as coalesced runs indexed by start, by end and by (length, start),
so extending, best fit and coalescing on release are dictionary lookups plus a
bisect. Evicted blocks go back to the pool and coalesce. ``free`` releases a
table tail first, so a sequence's tail blocks are evicted before its head,
which later prompts are more likely to share.
"""

from __future__ import annotations

import bisect
import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from sluice.runtime.kv_cache import blocks_for


def _chain_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """Hash of one full block: identifies the whole prefix ending at it."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


def contiguous_runs(blocks: Iterable[int]) -> Iterator[tuple[int, int]]:
    """Maximal runs ``(start, length)`` of consecutive ascending ids, in order."""
    start = length = 0
    for block in blocks:
        if length and block == start + length:
            length += 1
            continue
        if length:
            yield start, length
        start, length = block, 1
    if length:
        yield start, length


class _FreeRuns:
    """The free pool as maximal runs of consecutive block ids (always coalesced).

    Indexed three ways: start -> length (extend a table, merge a right
    neighbour), end -> start (merge a left neighbour), and a sorted list of
    (length, start) for best fit.
    """

    def __init__(self, num_blocks: int) -> None:
        self.count = 0
        self._length: dict[int, int] = {}
        self._start_by_end: dict[int, int] = {}
        self._by_size: list[tuple[int, int]] = []
        self.add(0, num_blocks)

    def length_at(self, start: int) -> int:
        """Length of the free run starting at ``start`` (0 if none does)."""
        return self._length.get(start, 0)

    def fit(self, n: int) -> tuple[int, int]:
        """The smallest run of at least ``n`` blocks, else the longest: (start, length)."""
        i = min(bisect.bisect_left(self._by_size, (n, -1)), len(self._by_size) - 1)
        length, start = self._by_size[i]
        return start, length

    def take(self, start: int, n: int) -> None:
        """Remove the first ``n`` blocks of the run starting at ``start``."""
        length = self._remove(start)
        if length > n:
            self._insert(start + n, length - n)
        self.count -= n

    def add(self, start: int, n: int) -> None:
        """Return blocks ``start .. start+n-1``, merging with neighbouring runs."""
        self.count += n
        end = start + n
        left = self._start_by_end.get(start)
        if left is not None:
            self._remove(left)
            start = left
        if end in self._length:
            end += self._remove(end)
        self._insert(start, end - start)

    def _insert(self, start: int, length: int) -> None:
        self._length[start] = length
        self._start_by_end[start + length] = start
        bisect.insort(self._by_size, (length, start))

    def _remove(self, start: int) -> int:
        length = self._length.pop(start)
        del self._start_by_end[start + length]
        del self._by_size[bisect.bisect_left(self._by_size, (length, start))]
        return length


@dataclass
class _Sequence:
    blocks: list[int] = field(default_factory=list)
    # Chained hashes of the first len(hashes) blocks: full, written, hashed.
    hashes: list[bytes] = field(default_factory=list)


class BlockManager:
    """Block tables, reference counts, prefix cache and free pool of one KV pool."""

    def __init__(self, num_blocks: int, block_size: int,
                 enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks: must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self._free = _FreeRuns(num_blocks)
        self._refcount = [0] * num_blocks
        self._seqs: dict[Hashable, _Sequence] = {}
        self._cached: dict[bytes, int] = {}        # chained hash -> block
        self._hash_of: dict[int, bytes] = {}       # block -> chained hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # LRU first

    @property
    def num_free_blocks(self) -> int:
        """Blocks referenced by no sequence: truly free plus cached-but-evictable."""
        return self._free.count + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by sequences."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def lookup_prefix(self, token_ids: Sequence[int]) -> int:
        """Tokens of ``token_ids`` whose KV is cached (what ``begin`` would reuse)."""
        return len(self._cached_prefix(token_ids)) * self.block_size

    def admission_cost(self, token_ids: Sequence[int], num_tokens: int) -> int:
        """Free-pool blocks that ``begin(token_ids)`` then ``allocate_slots(num_tokens)``
        would consume: new blocks, plus prefix hits that are now evictable (taking
        them removes them from the free count). Read-only."""
        hits = self._cached_prefix(token_ids)
        new = max(0, blocks_for(num_tokens, self.block_size) - len(hits))
        return new + sum(self._refcount[block] == 0 for _, block in hits)

    def begin(self, seq_id: Hashable, token_ids: Sequence[int]) -> int:
        """Start a sequence on its cached prefix; returns the number of cached tokens.

        Counts one prefix-cache query of ``len(token_ids)`` tokens when prefix
        caching is enabled.
        """
        if seq_id in self._seqs:
            raise ValueError(f"seq_id: {seq_id!r} already has blocks")
        seq = self._seqs[seq_id] = _Sequence()
        for block_hash, block in self._cached_prefix(token_ids):
            if self._refcount[block] == 0:
                del self._evictable[block]
            self._refcount[block] += 1
            seq.blocks.append(block)
            seq.hashes.append(block_hash)
        num_cached = len(seq.blocks) * self.block_size
        if self.enable_prefix_caching:
            self.prefix_cache_queries += len(token_ids)
            self.prefix_cache_hits += num_cached
        return num_cached

    def allocate_slots(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Grow the table to hold the first ``num_tokens`` tokens.

        Evicts least-recently-used cached blocks on shortage; returns False,
        changing nothing, when even that is not enough.
        """
        seq = self._seq(seq_id)
        needed = blocks_for(num_tokens, self.block_size) - len(seq.blocks)
        if needed <= 0:
            return True
        if needed > self.num_free_blocks:
            return False
        self._evict(needed - self._free.count)
        self._take(seq.blocks, needed)
        return True

    def commit(self, seq_id: Hashable, token_ids: Sequence[int],
               num_computed_tokens: int) -> None:
        """Record that the KV of ``token_ids[:num_computed_tokens]`` is written.

        Registers each newly full block in the prefix cache, unless an equal
        block is already registered (the table keeps its own copy).
        """
        seq = self._seq(seq_id)
        capacity = min(len(token_ids), len(seq.blocks) * self.block_size)
        if num_computed_tokens > capacity:
            raise ValueError(f"num_computed_tokens: {num_computed_tokens} exceeds the "
                             f"{capacity} tokens given and allocated for {seq_id!r}")
        if not self.enable_prefix_caching:
            return
        size = self.block_size
        for i in range(len(seq.hashes), num_computed_tokens // size):
            parent = seq.hashes[-1] if seq.hashes else b""
            block_hash = _chain_hash(parent, token_ids[i * size:(i + 1) * size])
            seq.hashes.append(block_hash)
            if block_hash not in self._cached:
                self._cached[block_hash] = seq.blocks[i]
                self._hash_of[seq.blocks[i]] = block_hash

    def free(self, seq_id: Hashable) -> None:
        """Release a sequence's blocks (no-op for an unknown id).

        Blocks no longer referenced become evictable (tail first) if cached,
        else free.
        """
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            self._release(seq.blocks)

    def truncate(self, seq_id: Hashable, num_tokens: int) -> None:
        """Shrink the table to the blocks holding the first ``num_tokens`` tokens,
        releasing the rest as `free` does (tail first): blocks reserved for
        positions the sequence will not fill, such as a draft's rejected tokens
        (speculative decoding). A table already that short is left as it is."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens: must be >= 0, got {num_tokens}")
        seq = self._seq(seq_id)
        keep = blocks_for(num_tokens, self.block_size)
        self._release(seq.blocks[keep:])
        del seq.blocks[keep:], seq.hashes[keep:]

    def __contains__(self, seq_id: Hashable) -> bool:
        """Whether the sequence has a table (begun and not freed)."""
        return seq_id in self._seqs

    def block_table(self, seq_id: Hashable) -> list[int]:
        """The sequence's block ids, in token order (a copy)."""
        return list(self._seq(seq_id).blocks)

    def block_groups(self, seq_id: Hashable) -> list[tuple[int, int]]:
        """The table as maximal contiguous runs ``(start, length)``, in table order."""
        return list(contiguous_runs(self._seq(seq_id).blocks))

    def reset_prefix_cache(self) -> None:
        """Forget every unreferenced cached block (referenced ones stay cached)."""
        self._evict(len(self._evictable))

    def _seq(self, seq_id: Hashable) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"seq_id: {seq_id!r} is not a live sequence") from None

    def _cached_prefix(self, token_ids: Sequence[int]) -> list[tuple[bytes, int]]:
        """(hash, block) of each leading cached full block, leaving one token uncached."""
        if not self.enable_prefix_caching:
            return []
        hits: list[tuple[bytes, int]] = []
        parent = b""
        size = self.block_size
        for i in range(max(0, (len(token_ids) - 1) // size)):
            parent = _chain_hash(parent, token_ids[i * size:(i + 1) * size])
            block = self._cached.get(parent)
            if block is None:
                break
            hits.append((parent, block))
        return hits

    def _release(self, blocks: list[int]) -> None:
        """Drop one reference to each of ``blocks``, last first; a block no longer
        referenced becomes evictable if cached, else free."""
        released: list[int] = []
        for block in reversed(blocks):
            self._refcount[block] -= 1
            if self._refcount[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    released.append(block)
        for start, length in contiguous_runs(reversed(released)):
            self._free.add(start, length)

    def _evict(self, n: int) -> None:
        """Return the ``n`` least-recently-used evictable blocks to the free pool."""
        for _ in range(n):
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._hash_of.pop(block)]
            self._free.add(block, 1)

    def _take(self, blocks: list[int], n: int) -> None:
        """Append ``n`` free blocks to ``blocks``, as contiguously as possible."""
        while n:
            start = blocks[-1] + 1 if blocks else -1
            length = self._free.length_at(start)
            if not length:
                start, length = self._free.fit(n)
            taken = min(n, length)
            self._free.take(start, taken)
            for block in range(start, start + taken):
                self._refcount[block] = 1
            blocks.extend(range(start, start + taken))
            n -= taken
