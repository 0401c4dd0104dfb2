"""Per-instance scheduler: which requests run in the next engine step, and how
many tokens each; it owns the requests' progress and their KV blocks.

Interface used by the engine (`sluice.runtime.engine`), one step being
``sched = schedule()`` -> the engine executes it -> ``update_from_output(sched, out)``:

- ``add(request)``, ``abort(request_id) -> Request | None``;
- ``schedule() -> SchedulerOutput``: plain data (`ScheduledRow` per request:
  id, new tokens, tokens computed before, block table; preempted ids; token
  counts; the swap copies ``(request id, device runs, host blocks)``);
- ``update_from_output(sched, ModelOutput) -> (sampled, broken)``: the only
  place request progress changes after a step: ``num_computed_tokens``
  advances, full blocks enter the prefix cache, sampled tokens are appended
  (`_record`), finished requests free their blocks;
- ``requests``: the waiting and running requests by id (the engine reads them
  to build the runner's rows);
- ``configure_swap(swapper, mode, kv_reuse)``; ``swap_out_failed(copy)`` and
  ``swap_in_failed(copy)`` when the engine's copy of a `SchedulerOutput` fails;
- ``detach(request)`` / ``attach(request)`` for live migration;
- counters ``num_waiting``, ``num_running``, ``has_unfinished``.

Each step has a token budget (``max_num_batched_tokens``), a sequence cap
(``max_num_seqs``) and a cap on prompt chunks (``max_prefill_seqs``, which keeps
the model runner's padded prefill shapes few). Running requests are served first (a decode costs one token,
an unfinished prompt gets the next chunk), then waiting requests are admitted
in policy order while budget, sequence slots and KV blocks last (a request
whose KV is copied in from host memory during the step runs from the next
one, with an asynchronous swapper). When blocks run
out, the policy names a running request to preempt: its blocks are freed and it
returns to the front of the waiting queue. With a host swap space
(`sluice.runtime.swap`), its KV is swapped out (only the blocks not already in
host memory are copied) and copied back in on resume; in ``auto`` mode the
swap happens only when the swap space's cost model estimates the copies to be
cheaper than recomputing; otherwise (or when the swap space is full) it is
recomputed, from the prefix cache and any host copies it kept. Either way its
seeded sampler state is unchanged, so its output does not change. A finished
request with a ``conversation`` id leaves its full blocks in host memory, and
the conversation's next turn copies them in instead of recomputing them.

A `Policy` (`sluice.scheduler.policies`: FCFS, priority, fair) orders the
waiting queue, picks preemption victims, and may let a waiting request (its
``displacer``) displace running ones that are not ``protected`` (priority
scheduling), and only when displacing all of those it outranks would make room
for it; the room freed goes to that request first. A request is displaced
at most ``max_preemptions`` times (preemptions forced by memory pressure do not
count), so it cannot thrash.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from sluice.runtime.block_manager import BlockManager, contiguous_runs
from sluice.runtime.request import Request, RequestStatus, TokenLogprobs
from sluice.runtime.swap import HostSwapSpace, SwapCopy, SwapExecutor
from sluice.scheduler.policies import FCFSPolicy, Policy

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ScheduledRow:
    """One request's share of a step: ``num_new_tokens`` tokens from position
    ``num_computed_tokens`` on, written into the blocks of ``block_table``."""

    request_id: str
    num_new_tokens: int
    num_computed_tokens: int
    block_table: list[int]



@dataclasses.dataclass
class SchedulerOutput:
    """What one step runs, as plain data (ids, block ids, token counts, copies)."""

    rows: list[ScheduledRow]
    preempted: list[str]  # request ids preempted this step
    num_tokens: int = 0  # new tokens over all rows
    num_prefill_tokens: int = 0  # of them, in prompt chunks (rows that are not decodes)
    swap_out: list[SwapCopy] = dataclasses.field(default_factory=list)  # before the step
    swap_in: list[SwapCopy] = dataclasses.field(default_factory=list)  # after swap_out
    host_release: list[int] = dataclasses.field(default_factory=list)  # host refs to drop after
    # True: issue swap_in while the step's forward runs; their requests are not in
    # ``rows`` (they run from the next step). False: before the forward.
    swap_in_overlaps: bool = False


@dataclasses.dataclass
class ModelOutput:
    """What one step produced: the rows that ran (the schedule's, less those of
    requests that failed the step on their own) and one sampled token, its log-prob and the top
    alternatives per row (rows of prompt chunks that do not finish their prompt
    hold garbage; `update_from_output` skips them)."""

    rows: list[ScheduledRow]
    token_ids: np.ndarray  # [rows]
    logprobs: np.ndarray  # [rows]
    top_ids: np.ndarray  # [rows, k]
    top_logprobs: np.ndarray  # [rows, k]


class LocalScheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, max_prefill_seqs: int = 4,
                 policy: Policy | None = None, max_preemptions: int = 4,
                 swap_space: HostSwapSpace | None = None):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_seqs = max_prefill_seqs
        self.policy = policy or FCFSPolicy()
        self.max_preemptions = max_preemptions
        self.swap_space = swap_space
        self.swapper: SwapExecutor | None = None  # set by `configure_swap`
        self.preemption_mode = "swap"
        self.kv_reuse = False
        self.num_swap_outs = 0
        self.num_recomputes = 0  # preemptions that dropped the KV
        self.num_reused_blocks = 0  # blocks copied in from host memory instead of recomputed
        self._release: list[int] = []
        self._swapping_in: set[int] = set()  # ids of requests with a copy-in this step
        self._swap_out: list[SwapCopy] = []
        self._swap_in: list[SwapCopy] = []
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # the waiting and running ones, by id
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def configure_swap(self, swapper: SwapExecutor, mode: str = "auto",
                       kv_reuse: bool = True) -> None:
        """Attach the copier of the swap space. ``mode`` "auto" swaps a preempted
        request only when its cost model estimates the copies to be cheaper than
        recomputing (else "swap": whenever host blocks are free); ``kv_reuse``
        keeps finished conversations' KV in host memory for their next turn. An
        asynchronous swapper's copy-ins overlap the step they are issued in, so
        their requests run from the next step."""
        self.swapper, self.preemption_mode, self.kv_reuse = swapper, mode, kv_reuse

    @property
    def overlap_swap_in(self) -> bool:
        return self.swapper is not None and self.swapper.asynchronous

    def add(self, request: Request) -> None:
        self.policy.on_add(request, self.waiting + self.running)
        request.status = RequestStatus.WAITING
        request.waiting_since = self.policy.clock()
        self.waiting.append(request)
        self.requests[request.request_id] = request

    def abort(self, request_id: str) -> Request | None:
        """Remove a request wherever it is; unknown ids return None."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        (self.running if req.status is RequestStatus.RUNNING else self.waiting).remove(req)
        self.bm.free(request_id)
        self._drop_host(req)
        return req

    def detach(self, request: Request) -> None:
        """Stop scheduling a running request without touching its blocks (it is
        being migrated); `attach` puts it back, here or on another instance. Its
        host copies (ids in this instance's swap space) are dropped."""
        self.running.remove(request)
        del self.requests[request.request_id]
        self._drop_host(request)

    def attach(self, request: Request, index: int | None = None) -> None:
        """Run a request whose KV is already in this instance's blocks."""
        request.status = RequestStatus.RUNNING
        self.running.insert(len(self.running) if index is None else index, request)
        self.requests[request.request_id] = request

    def update_from_output(self, sched: SchedulerOutput, output: ModelOutput
                           ) -> tuple[list[Request], list[tuple[Request, Exception]]]:
        """Record a step's results: each row's tokens are computed (and full
        blocks enter the prefix cache); a row that brings its request up to date
        appends the token sampled for it, and a request that finishes frees its
        blocks. Returns the requests that sampled a token, and those whose own
        tokens or text broke them while recording (the engine fails them)."""
        now = time.monotonic()
        sampled: list[Request] = []
        broken: list[tuple[Request, Exception]] = []
        tokens = output.token_ids.tolist()
        for i, row in enumerate(output.rows):
            req = self.requests[row.request_id]
            req.num_computed_tokens += row.num_new_tokens
            self.bm.commit(req.request_id, req.all_token_ids, req.num_computed_tokens)
            if req.num_computed_tokens < req.num_tokens:
                continue  # a prefill chunk that does not finish the prompt samples nothing
            try:
                self._record(req, tokens[i], output, i, now)
            except Exception as error:
                log.exception("request %s failed after sampling", req.parent_id)
                broken.append((req, error))
                continue
            sampled.append(req)
        return sampled, broken

    def _record(self, req: Request, token: int, output: ModelOutput, i: int,
                now: float) -> None:
        """Append the token sampled for ``req`` (row ``i`` of ``output``) with its
        log-probs: the one place a sampled token enters a request."""
        if req.params.logprobs is not None:
            k = req.params.logprobs
            top = {int(t): float(lp) for t, lp in zip(output.top_ids[i][:k],
                                                      output.top_logprobs[i][:k])}
            req.logprobs.append(TokenLogprobs(token, float(output.logprobs[i]), top))
        req.append_token(token, now)
        if req.is_finished:
            self._finish(req)

    def _finish(self, request: Request) -> None:
        self.running.remove(request)
        del self.requests[request.request_id]
        self._save_conversation(request)
        self.bm.free(request.request_id)

    def _drop_host(self, req: Request) -> None:
        if req.host_blocks:
            self.swap_space.release(req.host_blocks)
        req.host_blocks = []
        req.swapped_out = False

    def _save_conversation(self, req: Request) -> None:
        """Keep a finished turn's full blocks in host memory under its conversation
        id, copying only the blocks not there already (the copy is issued now,
        before its device blocks are freed)."""
        if not (self.kv_reuse and self.swapper is not None and req.conversation is not None):
            self._drop_host(req)
            return
        table = self.bm.block_table(req.request_id)
        full = min(req.num_computed_tokens // self.bm.block_size, len(table))
        keep = req.host_blocks[:full]
        self.swap_space.release(req.host_blocks[full:])
        req.host_blocks = []
        host = self.swap_space.reserve(full - len(keep))
        if host is None:  # no room for the rest: keep the part already in host memory
            host = []
        elif host:
            self.swapper.copy_out(list(contiguous_runs(table[len(keep):full])), host)
        self.swap_space.remember(req.conversation, req.all_token_ids, keep + host)

    def swap_out_failed(self, copy: SwapCopy) -> None:
        """A swap-out copy did not happen: the request recomputes instead."""
        req = self.requests[copy[0]]
        self._drop_host(req)
        req.num_computed_tokens = 0

    def swap_in_failed(self, copy: SwapCopy) -> None:
        """A swap-in copy did not happen: the request recomputes from the start
        (its table stays; recompute rewrites it)."""
        req = self.requests[copy[0]]
        self._drop_host(req)
        req.num_computed_tokens = 0
        if req.conversation is not None:
            self.swap_space.forget(req.conversation)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        self._swap_out, self._swap_in, self._release = [], [], []
        self._swapping_in = set()
        scheduled: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        prefills = 0
        displaced, claimant = self._displace_for_waiting()
        for req in self.policy.order(list(self.running)):
            if budget == 0:
                break
            if req not in self.running:  # preempted as a victim earlier in this loop
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            is_prefill = not req.is_decode(n)
            if is_prefill and prefills == self.max_prefill_seqs:
                continue
            if self._reserve(req, n, scheduled, preempted):
                scheduled.append((req, n))
                budget -= n
                prefills += is_prefill
        if not preempted:  # under memory pressure, admit nobody new this step
            self._admit(budget, prefills, scheduled, claimant)
        self.policy.account(scheduled)
        return self._output(scheduled, displaced + preempted)

    def _output(self, scheduled: list[tuple[Request, int]],
                preempted: list[Request]) -> SchedulerOutput:
        """The step as plain data; marks the requests' first scheduling."""
        now = time.monotonic()
        rows, prefill = [], 0
        for req, n in scheduled:
            rows.append(ScheduledRow(req.request_id, n, req.num_computed_tokens,
                                     self.bm.block_table(req.request_id)))
            prefill += 0 if req.is_decode(n) else n
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
        return SchedulerOutput(rows, [r.request_id for r in preempted],
                               sum(n for _, n in scheduled), prefill, self._swap_out,
                               self._swap_in, self._release, self.overlap_swap_in)

    def _displace_for_waiting(self) -> tuple[list[Request], Request | None]:
        """Preempt running requests the policy ranks below its displacer (a waiting
        request), while that one cannot be admitted (no sequence slot or no blocks).
        Returns the displaced and, if any, the request they made room for."""
        displaced: list[Request] = []
        head = None
        while self.policy.displaces and self.waiting and self.running:
            head = self.policy.displacer(self.waiting)
            now = self.policy.clock()
            movable = [r for r in self.running if r.num_displacements < self.max_preemptions
                       and not self.policy.protected(r, now)]
            if not movable:
                break
            victim = self.policy.victim(movable)
            if not self.policy.outranks(head, victim):
                break
            need = self._blocks_to_admit(head, self.max_num_batched_tokens)
            if len(self.running) < self.max_num_seqs and need <= self.bm.num_free_blocks:
                break  # the head gets in without displacing anyone
            if not displaced and not self._room_by_displacing(head, need, movable):
                break  # displacing everyone it may would still not fit it: displace no one
            self._preempt(victim)
            victim.num_displacements += 1
            displaced.append(victim)
        return displaced, head if displaced else None

    def _reserve(self, req: Request, n: int, scheduled: list, preempted: list) -> bool:
        """Get blocks for ``n`` more tokens of a running request, preempting others
        (never ones already scheduled this step) as needed; False if ``req``
        itself had to go."""
        while not self.bm.allocate_slots(req.request_id, req.num_computed_tokens + n):
            taken = {id(r) for r, _ in scheduled}
            candidates = [r for r in self.running if id(r) not in taken]
            victim = self.policy.victim(candidates)
            self._preempt(victim)
            preempted.append(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        """Swap the request out if swap space allows, else drop its KV (recompute)."""
        self.running.remove(req)
        if not self._swap_out_blocks(req):
            req.num_computed_tokens = 0  # its host copies, if any, stay for the resume
            self.num_recomputes += 1
        self.bm.free(req.request_id)
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        req.waiting_since = self.policy.clock()
        self.waiting.insert(0, req)
        self.num_preemptions += 1

    def _swap_out_blocks(self, req: Request) -> bool:
        """Reserve host blocks for the request's computed KV and queue the copy of
        the blocks not already in host memory; False = recompute instead (no
        swap space, too little of it, or recompute estimated cheaper)."""
        n = -(-req.num_computed_tokens // self.bm.block_size)
        if self.swap_space is None or n == 0:
            return False
        keep = req.host_blocks[:n]
        new = n - len(keep)
        if (self.preemption_mode == "auto" and self.swapper is not None
                and not self.swapper.cost.prefer_swap(new, n, req.num_computed_tokens)):
            return False
        host = self._reserve_host(new, req)
        if host is None:  # swap space exhausted: recompute instead
            return False
        if new:
            table = self.bm.block_table(req.request_id)
            self._swap_out.append((req.request_id, list(contiguous_runs(table[len(keep):n])), host))
        self.swap_space.release(req.host_blocks[n:])
        req.host_blocks = keep + host
        req.swapped_out = True
        self.num_swap_outs += 1
        return True

    def _reserve_host(self, n: int, req: Request) -> list[int] | None:
        """``n`` host blocks; on shortage, running requests give up the host copies
        they keep only for reuse (not ones being copied in this step)."""
        if n == 0:
            return []
        host = self.swap_space.reserve(n)
        if host is not None:
            return host
        kept = [r for r in self.waiting if not r.swapped_out] + self.running[::-1]
        for other in kept:
            if host is not None:
                break
            if other is req or not other.host_blocks or id(other) in self._swapping_in:
                continue
            self.swap_space.release(other.host_blocks)
            other.host_blocks = []
            host = self.swap_space.reserve(n)
        return host

    def _begin(self, req: Request) -> list[int] | None:
        """Register a request with the block manager: a swapped one keeps its
        computed tokens (they come back from host memory), others take prefix hits
        and then host copies that extend them (its own, kept from before a
        recompute preemption, or its conversation's previous turn). Returns those
        host blocks (covering the table from block 0), or None."""
        if req.swapped_out:
            self.bm.begin(req.request_id, [])
            return None
        req.num_cached_tokens = self.bm.begin(req.request_id, req.all_token_ids)
        req.num_computed_tokens = req.num_cached_tokens
        host = self._host_prefix(req)
        if host is not None:
            req.num_computed_tokens = len(host) * self.bm.block_size
        return host

    def _host_prefix(self, req: Request) -> list[int] | None:
        if self.swap_space is None:
            return None
        limit = (req.num_tokens - 1) // self.bm.block_size  # one token must be computed
        host = req.host_blocks[:limit]
        if not host and self.kv_reuse and req.conversation is not None:
            host = self.swap_space.match(req.conversation, req.all_token_ids, limit)
        if len(host) * self.bm.block_size <= req.num_cached_tokens:
            return None  # the device prefix cache has at least as much
        return host

    def _reuse_in(self, req: Request, host: list[int]) -> None:
        """Queue the copy-in of host blocks past the device prefix hits."""
        first = req.num_cached_tokens // self.bm.block_size
        if not req.host_blocks:  # the conversation's blocks: take references
            self.swap_space.retain(host)
            req.host_blocks = list(host)
        table = self.bm.block_table(req.request_id)[first:len(host)]
        self._swap_in.append((req.request_id, list(contiguous_runs(table)), host[first:]))
        self._swapping_in.add(id(req))
        self.num_reused_blocks += len(host) - first
        req.num_cached_tokens = len(host) * self.bm.block_size

    def _swap_in_blocks(self, req: Request) -> None:
        host = req.host_blocks
        table = self.bm.block_table(req.request_id)[:len(host)]
        self._swap_in.append((req.request_id, list(contiguous_runs(table)), host))
        self._swapping_in.add(id(req))
        req.swapped_out = False
        # Keep the host copies of full blocks (they never change) so a later swap-out
        # copies only new blocks; a partial last block will change. Without reuse, keep none.
        full = req.num_computed_tokens // self.bm.block_size if self.kv_reuse else 0
        self._release.extend(req.host_blocks[full:])
        req.host_blocks = req.host_blocks[:full]

    def _admit(self, budget: int, prefills: int, scheduled: list[tuple[Request, int]],
               claimant: Request | None = None) -> None:
        """Admit waiting requests in policy order; ``claimant`` (the request running
        ones were displaced for) goes first."""
        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
               and prefills < self.max_prefill_seqs):
            req = claimant if claimant in self.waiting else self.policy.next_waiting(self.waiting)
            claimant = None
            if not self._may_fit(req, budget):
                break
            reuse = self._begin(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.bm.allocate_slots(req.request_id, req.num_computed_tokens + n):
                self.bm.free(req.request_id)
                if not req.swapped_out:
                    req.num_computed_tokens = 0
                break
            if req.swapped_out:
                self._swap_in_blocks(req)
            elif reuse is not None:
                self._reuse_in(req, reuse)
            self.waiting.remove(req)
            self.running.append(req)
            req.status = RequestStatus.RUNNING
            req.running_since = self.policy.clock()
            # A request whose copy-in overlaps this step runs from the next one; it
            # still takes its share of this step's limits, so a step starts no more
            # copy-ins than it could have run.
            if not (self.overlap_swap_in and id(req) in self._swapping_in):
                scheduled.append((req, n))
            budget -= n
            prefills += 1

    def _may_fit(self, req: Request, budget: int) -> bool:
        """Cheap read-only check before `begin`, so a request that cannot get its
        blocks is not admitted and rolled back (and counted as a cache query) every step."""
        return self._blocks_to_admit(req, budget) <= self.bm.num_free_blocks

    def _blocks_to_admit(self, req: Request, budget: int) -> int:
        """New blocks admitting ``req`` with ``budget`` tokens would take."""
        if req.swapped_out:  # all its blocks are new
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            return -(-(req.num_computed_tokens + n) // self.bm.block_size)
        cached = self.bm.lookup_prefix(req.all_token_ids)
        n = min(req.num_tokens - cached, budget)
        return self.bm.admission_cost(req.all_token_ids, cached + n)

    def _room_by_displacing(self, head: Request, need: int, movable: list[Request]) -> bool:
        """Whether displacing every request of ``movable`` that ``head`` outranks
        would free the ``need`` blocks it lacks (at most: shared blocks may stay in use)."""
        outranked = [r for r in movable if self.policy.outranks(head, r)]
        freed = sum(len(self.bm.block_table(r.request_id)) for r in outranked)
        return need <= self.bm.num_free_blocks + freed
