"""Per-instance scheduler: which requests run in the next engine step, and how
many tokens each.

Interface used by the engine (`sluice.runtime.engine`):

- ``add(request)``, ``abort(request_id) -> Request | None``,
  ``finish(request)`` (frees its blocks), ``schedule() -> SchedulerOutput``;
- counters ``num_waiting``, ``num_running``, ``has_unfinished``.

Each step has a token budget (``max_num_batched_tokens``), a sequence cap
(``max_num_seqs``) and a cap on prompt chunks (``max_prefill_seqs``, which keeps
the model runner's padded prefill shapes few). Running requests are served first (a decode costs one token,
an unfinished prompt gets the next chunk), then waiting requests are admitted
in policy order while budget, sequence slots and KV blocks last. When blocks run
out, the policy names a running request to preempt by recompute: its blocks are
freed and it returns to the front of the waiting queue; it resumes from the
prefix cache and its seeded sampler state, so its output does not change.

A `Policy` (`sluice.scheduler.policies`: FCFS, priority, fair) orders the
waiting queue, picks preemption victims, and may let a waiting request displace
a running one (priority scheduling); a request is displaced at most
``max_preemptions`` times (preemptions forced by memory pressure do not count),
so it cannot thrash.
"""

from __future__ import annotations

import dataclasses
from sluice.runtime.block_manager import BlockManager, contiguous_runs
from sluice.runtime.request import Request, RequestStatus
from sluice.runtime.swap import HostSwapSpace
from sluice.scheduler.policies import FCFSPolicy, Policy

# (request, device block runs, host swap blocks) of one swap copy.
SwapCopy = tuple[Request, list[tuple[int, int]], list[int]]


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]]  # (request, number of new tokens)
    preempted: list[Request]
    swap_out: list[SwapCopy] = dataclasses.field(default_factory=list)  # before the step
    swap_in: list[SwapCopy] = dataclasses.field(default_factory=list)  # after swap_out

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


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
        self.num_swap_outs = 0
        self._swap_out: list[SwapCopy] = []
        self._swap_in: list[SwapCopy] = []
        self.waiting: list[Request] = []
        self.running: list[Request] = []
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

    def add(self, request: Request) -> None:
        self.policy.on_add(request, self.waiting + self.running)
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Remove a request wherever it is; unknown ids return None."""
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    self.bm.free(request_id)
                    if req.swapped_blocks is not None:
                        self.swap_space.release(req.swapped_blocks)
                        req.swapped_blocks = None
                    return req
        return None

    def finish(self, request: Request) -> None:
        self.running.remove(request)
        self.bm.free(request.request_id)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        self._swap_out, self._swap_in = [], []
        scheduled: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        prefills = 0
        displaced = self._displace_for_waiting()
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
            self._admit(budget, prefills, scheduled)
        self.policy.account(scheduled)
        return SchedulerOutput(scheduled, displaced + preempted, self._swap_out, self._swap_in)

    def _displace_for_waiting(self) -> list[Request]:
        """Preempt running requests the policy ranks below the next waiting one,
        while that one cannot be admitted (no sequence slot or no blocks)."""
        displaced = []
        while self.waiting and self.running:
            head = self.policy.next_waiting(self.waiting)
            movable = [r for r in self.running if r.num_displacements < self.max_preemptions]
            if not movable:
                break
            victim = self.policy.victim(movable)
            if not self.policy.outranks(head, victim):
                break
            if (len(self.running) < self.max_num_seqs
                    and self._may_fit(head, self.max_num_batched_tokens)):
                break  # the head gets in without displacing anyone
            self._preempt(victim)
            victim.num_displacements += 1
            displaced.append(victim)
        return displaced

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
            req.num_computed_tokens = 0
        self.bm.free(req.request_id)
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.insert(0, req)
        self.num_preemptions += 1

    def _swap_out_blocks(self, req: Request) -> bool:
        """Reserve host blocks for the request's computed KV and queue the copy."""
        n = -(-req.num_computed_tokens // self.bm.block_size)
        if self.swap_space is None or n == 0:
            return False
        host = self.swap_space.reserve(n)
        if host is None:  # swap space exhausted: recompute instead
            return False
        runs = list(contiguous_runs(self.bm.block_table(req.request_id)[:n]))
        self._swap_out.append((req, runs, host))
        req.swapped_blocks = host
        self.num_swap_outs += 1
        return True

    def _begin(self, req: Request) -> None:
        """Register a request with the block manager: a swapped one keeps its
        computed tokens (they come back from host memory), others take prefix hits."""
        if req.swapped_blocks is not None:
            self.bm.begin(req.request_id, [])
        else:
            req.num_cached_tokens = self.bm.begin(req.request_id, req.all_token_ids)
            req.num_computed_tokens = req.num_cached_tokens

    def _swap_in_blocks(self, req: Request) -> None:
        host = req.swapped_blocks
        table = self.bm.block_table(req.request_id)[:len(host)]
        self._swap_in.append((req, list(contiguous_runs(table)), host))
        req.swapped_blocks = None

    def _admit(self, budget: int, prefills: int, scheduled: list[tuple[Request, int]]) -> None:
        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
               and prefills < self.max_prefill_seqs):
            req = self.policy.next_waiting(self.waiting)
            if not self._may_fit(req, budget):
                break
            self._begin(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.bm.allocate_slots(req.request_id, req.num_computed_tokens + n):
                self.bm.free(req.request_id)
                if req.swapped_blocks is None:
                    req.num_computed_tokens = 0
                break
            if req.swapped_blocks is not None:
                self._swap_in_blocks(req)
            self.waiting.remove(req)
            self.running.append(req)
            req.status = RequestStatus.RUNNING
            scheduled.append((req, n))
            budget -= n
            prefills += 1

    def _may_fit(self, req: Request, budget: int) -> bool:
        """Cheap read-only check before `begin`, so a request that cannot get its
        blocks is not admitted and rolled back (and counted as a cache query) every step."""
        if req.swapped_blocks is not None:  # all its blocks are new
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            need = -(-(req.num_computed_tokens + n) // self.bm.block_size)
        else:
            cached = self.bm.lookup_prefix(req.all_token_ids)
            n = min(req.num_tokens - cached, budget)
            need = self.bm.admission_cost(req.all_token_ids, cached + n)
        return need <= self.bm.num_free_blocks
