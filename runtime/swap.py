"""Host-memory swap space for KV blocks, and the copies that fill and drain it.

`HostSwapSpace` is a numpy pool of blocks shaped like the device pool's
(``[num_blocks, num_layers, 2, block_size, kv_heads, head_dim]``) with a free
list and a reference count per block. The scheduler reserves, retains and
releases host blocks (bookkeeping only); `SwapExecutor` moves the data. A host
block may be referenced by several owners at once: a swapped-out request, a
running request that keeps the host copy of its full blocks (so a later
swap-out copies only the blocks that changed), and a conversation entry.

Multi-turn KV reuse: when a request carrying a ``conversation`` id finishes,
its full blocks stay in host memory under that id (``remember``), in a bounded
least-recently-used table: ``reserve`` evicts the least recently used entries
when it runs short. The conversation's next turn (``match``) takes the longest
block-aligned prefix of its prompt that equals the stored tokens, and copies
in only those blocks instead of recomputing them. Exhaustion is not an error:
``reserve`` returns None and the scheduler falls back to recompute.

`SwapExecutor` runs a step's copies on the engine thread. It moves each
contiguous run of device blocks as a few power-of-two pieces (a run of ``n``
blocks is one piece per set bit of ``n``, so the compiled copies stay few)
through the model runner's block mover (`ModelRunner.gather` / `copy_in`, the
one that live migration uses too). Its copy granularity is three methods
(``split``, ``issue_out``, ``issue_in``) that `bench/preemption.py`'s
per-block and per-layer-block baselines override; the runtime has no other
copy path.

- Swap-outs are issued before the step's forward. Asynchronous swapping
  (``asynchronous``): the slices are dispatched on the engine thread (JAX
  orders them before any later write to the pool, so the device blocks can be
  reused at once: no block is overwritten while a copy from it is in flight),
  and a worker thread waits for them and stores them into the host pool. A
  swap-in from host blocks whose store is still pending waits for it first; a
  single worker keeps stores to one host block in order.
- Swap-ins, synchronous: complete (``block_until_ready``) before the step's
  forward, whose requests include the ones swapped in. Asynchronous: issued
  while the step's forward runs (``behind`` = that step's output) and not
  waited for; the scheduler runs their requests from the next step, which the
  pool's data dependency orders after the copies, so the copy overlaps a
  forward step instead of stalling one. Either way a request resumes only
  after its swap-in completes.

`SwapCostModel` estimates the time to swap a request (bytes / measured copy
bandwidth plus a per-copy overhead) and to recompute it (tokens x measured
prefill time per token), both exponential moving averages started from priors;
the scheduler asks it per preempted request (``preemption_mode="auto"``). It
charges swap-ins at full cost even when they overlap a step (conservative), and
samples copy bandwidth from synchronous swap-ins and from the stores of
swap-outs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import jax
import numpy as np

from sluice.runtime.kv_cache import KVCacheSpec

if TYPE_CHECKING:
    from sluice.runtime.model_runner import ModelRunner

# Largest slice of one grouped copy. Bounding the staging buffers lets the
# allocator recycle them: on CPU, a fresh 100 MB staging buffer costs more in
# page faults than the copy itself (measured: bench/RESULTS.md, preemption).
MAX_PIECE_BYTES = 8 << 20


@dataclasses.dataclass
class _Conversation:
    tokens: list[int]  # the tokens whose KV the blocks hold (whole blocks)
    blocks: list[int]


class HostSwapSpace:
    def __init__(self, spec: KVCacheSpec, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"swap_space: must hold at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = spec.block_size
        self.bytes_per_block = spec.bytes_per_block
        self.blocks = np.zeros((num_blocks,) + spec.shape[1:], np.dtype(spec.dtype))
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self.conversations: OrderedDict[str, _Conversation] = OrderedDict()  # LRU first
        self.num_conversation_evictions = 0

    @classmethod
    def for_budget(cls, spec: KVCacheSpec, budget_bytes: int) -> "HostSwapSpace":
        return cls(spec, int(budget_bytes // spec.bytes_per_block))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def reserve(self, n: int) -> list[int] | None:
        """``n`` host blocks (one reference each), evicting least recently used
        conversations as needed; None (nothing reserved) if still too few."""
        while n > len(self._free) and self.conversations:
            _, entry = self.conversations.popitem(last=False)
            self.release(entry.blocks)
            self.num_conversation_evictions += 1
        if n > len(self._free):
            return None
        ids = [self._free.pop() for _ in range(n)]
        for i in ids:
            self._refs[i] = 1
        return ids

    def retain(self, ids: Sequence[int]) -> None:
        for i in ids:
            if self._refs[i] <= 0:
                raise ValueError(f"host block {i} is free")
            self._refs[i] += 1

    def release(self, ids: Sequence[int]) -> None:
        """Drop one reference on each block; unreferenced blocks become free."""
        for i in reversed(ids):
            if self._refs[i] <= 0:
                raise ValueError(f"host block {i} released more often than reserved")
            self._refs[i] -= 1
            if self._refs[i] == 0:
                self._free.append(i)

    # -- conversations (multi-turn reuse) ------------------------------------

    def remember(self, conversation: str, tokens: Sequence[int], blocks: list[int]) -> None:
        """Keep ``blocks`` (holding the KV of ``tokens``, whole blocks) under the
        conversation id; takes over the caller's references. Replaces an older entry."""
        old = self.conversations.pop(conversation, None)
        if old is not None:
            self.release(old.blocks)
        if blocks:
            self.conversations[conversation] = _Conversation(
                list(tokens[:len(blocks) * self.block_size]), list(blocks))

    def forget(self, conversation: str) -> None:
        old = self.conversations.pop(conversation, None)
        if old is not None:
            self.release(old.blocks)

    def match(self, conversation: str | None, token_ids: Sequence[int],
              max_blocks: int) -> list[int]:
        """Host blocks of the longest block-aligned prefix (at most ``max_blocks``)
        of ``token_ids`` stored for the conversation; not retained. Marks it used."""
        entry = self.conversations.get(conversation) if conversation is not None else None
        if entry is None:
            return []
        self.conversations.move_to_end(conversation)
        size, n = self.block_size, min(max_blocks, len(entry.blocks))
        m = 0
        while m < n and entry.tokens[m * size:(m + 1) * size] == list(
                token_ids[m * size:(m + 1) * size]):
            m += 1
        return entry.blocks[:m]

    # -- data ------------------------------------------------------------------

    def store(self, ids: list[int], staging: np.ndarray) -> None:
        self.blocks[ids] = staging[:len(ids)]

    def load(self, ids: list[int]) -> np.ndarray:
        return self.blocks[ids]  # fancy indexing: a fresh array, safe to hand to the device


# -- copies ----------------------------------------------------------------------


def _pieces(runs: Sequence[tuple[int, int]],
            max_piece: int = 1 << 30) -> list[tuple[int, int]]:
    """(start, size) slices covering the runs in order: for each run,
    ``max_piece``-block slices (a power of two) then one per set bit of the
    remainder (sizes are powers of two, so compiled copies stay few)."""
    out = []
    for start, length in runs:
        off = 0
        while length - off >= max_piece:
            out.append((start + off, max_piece))
            off += max_piece
        rest = length - off
        for bit in reversed(range(rest.bit_length())):
            size = 1 << bit
            if rest & size:
                out.append((start + off, size))
                off += size
    return out


@dataclasses.dataclass
class SwapStats:
    num_swap_outs: int = 0      # copies to host (preemptions and conversation saves)
    num_swap_ins: int = 0
    blocks_out: int = 0
    blocks_in: int = 0
    copy_calls: int = 0         # device copy operations issued
    # engine-thread time in copies or waiting for them; a swap-in issued during a step
    # counts only if that step had finished once it was issued (then all of it)
    stall_s: float = 0.0

    def bytes(self, bytes_per_block: int) -> dict[str, int]:
        return {"out": self.blocks_out * bytes_per_block, "in": self.blocks_in * bytes_per_block}


PREFILL_SHARE = 0.75  # of a step's tokens, for the step to sample the prefill rate


class SwapCostModel:
    """Running estimates of copy and recompute time (exponential moving averages)."""

    def __init__(self, bytes_per_block: int, copy_bytes_per_s: float = 4e9,
                 prefill_s_per_token: float = 2e-4, overhead_s: float = 2e-4,
                 alpha: float = 0.2, min_step_tokens: int = 32):
        self.bytes_per_block = bytes_per_block
        self.copy_bytes_per_s = copy_bytes_per_s
        self.prefill_s_per_token = prefill_s_per_token
        self.overhead_s = overhead_s
        self.alpha = alpha
        self.min_step_tokens = min_step_tokens
        self.num_copy_samples = 0
        self.num_step_samples = 0

    def observe_copy(self, num_bytes: int, seconds: float) -> None:
        if num_bytes <= 0 or seconds <= 0:
            return
        a = self.alpha
        self.copy_bytes_per_s = (1 - a) * self.copy_bytes_per_s + a * num_bytes / seconds
        self.num_copy_samples += 1

    def observe_step(self, num_tokens: int, num_prefill_tokens: int, seconds: float) -> None:
        """A forward step over ``num_tokens`` tokens, ``num_prefill_tokens`` of them
        prompt tokens. Only steps that are mostly prefill count: a decode row costs
        far more per token (it streams the weights for one token), so mixed steps
        would overstate what recomputing a prompt costs."""
        if (num_prefill_tokens < max(self.min_step_tokens, PREFILL_SHARE * num_tokens)
                or seconds <= 0):
            return
        a = self.alpha
        self.prefill_s_per_token = (1 - a) * self.prefill_s_per_token + a * seconds / num_tokens
        self.num_step_samples += 1

    def swap_seconds(self, blocks_out: int, blocks_in: int) -> float:
        return (2 * self.overhead_s
                + (blocks_out + blocks_in) * self.bytes_per_block / self.copy_bytes_per_s)

    def recompute_seconds(self, num_tokens: int) -> float:
        return num_tokens * self.prefill_s_per_token

    def prefer_swap(self, blocks_out: int, blocks_in: int, num_tokens: int) -> bool:
        return self.swap_seconds(blocks_out, blocks_in) < self.recompute_seconds(num_tokens)


# (request id, device block runs, host blocks) of one copy; see sluice.scheduler.local.
SwapCopy = tuple[Any, list[tuple[int, int]], list[int]]


class SwapExecutor:
    """Runs swap copies between a `ModelRunner`'s pool and a `HostSwapSpace`.

    The copy granularity is ``split`` (device runs -> the pieces copied),
    ``issue_out`` and ``issue_in`` (one piece list each way) and
    ``copies_per_piece`` (device copy operations per piece, for the stats);
    `bench/preemption.py`'s baselines override them."""

    copies_per_piece = 1

    def __init__(self, runner: "ModelRunner", space: HostSwapSpace, asynchronous: bool = True,
                 cost: SwapCostModel | None = None):
        self.runner, self.space = runner, space
        self.asynchronous = asynchronous
        self.cost = cost or SwapCostModel(space.bytes_per_block)
        self.stats = SwapStats()
        self._pending: dict[int, Future] = {}  # host block -> its latest in-flight store
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(1, "sluice-swap") if asynchronous else None
        fit = max(1, MAX_PIECE_BYTES // space.bytes_per_block)
        self.max_piece = 1 << (fit.bit_length() - 1)  # a power of two

    # -- the step's copies ----------------------------------------------------

    def run(self, swap_out: list[SwapCopy], swap_in: list[SwapCopy],
            release: list[int] = (), on_out_failure: Callable[[SwapCopy], None] | None = None,
            on_in_failure: Callable[[SwapCopy], None] | None = None,
            behind: jax.Array | None = None) -> None:
        """Outs first (an in may reuse device blocks an out just vacated; device
        work runs in dispatch order), then ins; then drop the host references in
        ``release``. Without ``behind`` the ins are complete on return; with it
        (an output of the forward step in flight) they are only issued, and count
        as stall (at most) only if that step had finished once they were. A copy that fails
        is handed to the failure callback, so nothing leaks and no KV is trusted
        unstored."""
        if not (swap_out or swap_in or release):
            return
        pending = list(swap_out)
        try:
            while pending:
                self.copy_out(pending[0][1], pending[0][2])
                pending.pop(0)
            if swap_in:
                self._swap_in(swap_in, behind)
        except BaseException:
            try:
                for copy in pending:
                    if on_out_failure:
                        on_out_failure(copy)
            finally:
                self.abandon(swap_in, release, on_in_failure)
            raise
        if release:
            self.space.release(release)

    def abandon(self, swap_in: list[SwapCopy], release: Sequence[int],
                on_in_failure: Callable[[SwapCopy], None] | None) -> None:
        """Give up swap-ins that failed or will not be issued: each goes to the
        failure callback (its request recomputes), then the host references in
        ``release`` drop, as `run` would have dropped them."""
        try:
            for copy in swap_in:
                if on_in_failure:
                    on_in_failure(copy)
        finally:
            if release:
                self.space.release(release)

    def _swap_in(self, copies: list[SwapCopy], behind: jax.Array | None) -> None:
        start = time.perf_counter()
        self.wait([h for _, _, host in copies for h in host])  # not copy time
        t0 = time.perf_counter()
        for _, runs, host in copies:
            self._copy_in(runs, host)
        if behind is None:
            jax.block_until_ready(self.runner.kv_cache)
            n = sum(len(host) for _, _, host in copies)
            self.cost.observe_copy(n * self.space.bytes_per_block, time.perf_counter() - t0)
        if behind is None or behind.is_ready():  # the device waited on these copies (at most)
            self.stats.stall_s += time.perf_counter() - start

    @contextlib.contextmanager
    def _stall(self):
        """Engine-thread time spent inside counts as stall."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stats.stall_s += time.perf_counter() - start

    def copy_out(self, runs: list[tuple[int, int]], host: list[int]) -> None:
        """Device runs -> host blocks (same order); asynchronous if configured."""
        with self._stall():
            pieces = self.split(runs)
            self.stats.num_swap_outs += 1
            self.stats.blocks_out += len(host)
            self.stats.copy_calls += len(pieces) * self.copies_per_piece
            self.issue_out(pieces, host)

    def split(self, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The (start, size) pieces that copy ``runs``: power-of-two groups."""
        return _pieces(runs, self.max_piece)

    def issue_out(self, pieces: list[tuple[int, int]], host: list[int]) -> None:
        """Copy the pieces to the host blocks (in order): synchronously, one piece
        fetched before the next is issued, or all dispatched at once and stored by
        the worker thread."""
        gather = self.runner.gather
        if not self.asynchronous:
            self.store(host, (gather([piece]) for piece in pieces))  # lazily
            return
        staged = [gather([piece]) for piece in pieces]  # dispatch only
        future = self._worker.submit(self.store, list(host), staged)
        with self._lock:
            for h in host:
                self._pending[h] = future

    def store(self, host: list[int], staged: Iterable[jax.Array]) -> None:
        """Write staged device pieces into the host blocks, in order, and time it."""
        t0 = time.perf_counter()
        off = 0
        for a in staged:  # piece by piece: no staging buffer as large as the whole copy
            self.space.store(host[off:off + a.shape[0]], np.asarray(a))
            off += a.shape[0]
        self.cost.observe_copy(len(host) * self.space.bytes_per_block, time.perf_counter() - t0)

    def _copy_in(self, runs: list[tuple[int, int]], host: list[int]) -> None:
        """Host blocks -> device runs (the caller waited for pending stores into them)."""
        pieces = self.split(runs)
        self.issue_in(pieces, host)
        self.stats.num_swap_ins += 1
        self.stats.blocks_in += len(host)
        self.stats.copy_calls += len(pieces) * self.copies_per_piece

    def issue_in(self, pieces: list[tuple[int, int]], host: list[int]) -> None:
        """Write the host blocks (in order) into the pieces through the block mover;
        issued, not waited for."""
        off = 0
        for start, size in pieces:
            # a fresh host array per piece, written through the runner's block mover
            self.runner.copy_in([(start, size)], self.space.load(host[off:off + size]))
            off += size

    def wait(self, host: Sequence[int] | None = None) -> None:
        """Block until the pending stores into ``host`` (default: all) are done."""
        with self._lock:
            keys = self._pending.keys() if host is None else host
            futures = {id(f): f for f in (self._pending.get(h) for h in keys) if f is not None}
        for f in futures.values():
            f.result()
        with self._lock:  # forget finished stores
            for h in [h for h, f in self._pending.items() if f.done() and f.exception() is None]:
                del self._pending[h]

    def close(self) -> None:
        if self._worker is not None:
            self.wait()
            self._worker.shutdown(wait=True)
