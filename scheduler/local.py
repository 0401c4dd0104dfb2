"""Per-instance scheduler: which requests run in the next engine step, and how
many tokens each; it owns the requests' progress and the instance's KV cache
manager (`sluice.runtime.kv_manager.KVCacheManager`: device blocks, host swap
space, conversation cache), which nothing else mutates.

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
- live migration (`sluice.runtime.migration`): ``detach(request)``,
  ``attach(request, index, num_computed_tokens)``, ``movable(request)``,
  ``reserve_blocks(seq_id, num_blocks)``, ``free_blocks(seq_id)``;
- ``kv``: the KV cache manager, to read (tables, free blocks, host copies);
- counters ``num_waiting``, ``num_running``, ``has_unfinished``, and
  ``demand_blocks`` (what the waiting requests need to start: the load report's
  demand figure).

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

With ``num_speculative_tokens`` (`sluice.runtime.spec_decode`), decodes of
requests that may draft (greedy or sampled; not structured outputs) take an
n-gram draft as extra tokens of their row, from what the budget and blocks leave
once every other row is scheduled (while its drafts are expected to pay:
`spec_decode.DraftOutlook`), and `update_from_output` keeps the verified
run (the rejection rule; ``spec_stats`` counts drafts and accepted tokens) and
releases the blocks reserved for the rejected rest.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from sluice.runtime.kv_manager import KVCacheManager, blocks_to_start
from sluice.runtime.request import Request, RequestStatus, TokenLogprobs
from sluice.runtime.spec_decode import (DraftOutlook, SpecDecodeStats, draft_for,
                                         drafts_pay, may_draft)
from sluice.runtime.swap import SwapCopy, SwapExecutor
from sluice.scheduler.policies import FCFSPolicy, Policy

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ScheduledRow:
    """One request's share of a step: ``num_new_tokens`` tokens from position
    ``num_computed_tokens`` on, written into the blocks of ``block_table``. A
    row with a ``draft`` (speculative decoding, `sluice.runtime.spec_decode`) is
    a decode-ready request's last token followed by its draft tokens
    (``num_new_tokens = 1 + len(draft)``)."""

    request_id: str
    num_new_tokens: int
    num_computed_tokens: int
    block_table: list[int]
    draft: list[int] = dataclasses.field(default_factory=list)


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
    # [rows] objects: None, or a prompt chunk's (first position, [TokenLogprobs]) for
    # a request that needs prompt log-probs (`sluice.runtime.model_runner`)
    prompt_logprobs: np.ndarray | None = None
    # [rows] objects: None, or for a row with a draft the sampler's (token ids,
    # log-probs, top ids, top log-probs) at each of its 1 + len(draft) positions
    # (`update_from_output` verifies the draft)
    spec_token_ids: np.ndarray | None = None


# One sampled token as the runner returns it: (token id, its log-prob, the top
# alternatives' ids and log-probs).
Sample = tuple[int, float, np.ndarray, np.ndarray]


class LocalScheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int,
                 max_num_batched_tokens: int, max_prefill_seqs: int = 4,
                 policy: Policy | None = None, max_preemptions: int = 4,
                 num_speculative_tokens: int = 0):
        self.kv = kv
        self.num_speculative_tokens = num_speculative_tokens  # draft tokens per row; 0: off
        self.spec_stats = SpecDecodeStats()  # drafts verified so far
        self.draft_outlooks: dict[str, DraftOutlook] = {}  # whether a request's drafts pay
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_seqs = max_prefill_seqs
        self.policy = policy or FCFSPolicy()
        self.max_preemptions = max_preemptions
        self.num_swap_outs = 0
        self.num_recomputes = 0  # preemptions that dropped the KV
        self.num_reused_blocks = 0  # blocks copied in from host memory instead of recomputed
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

    @property
    def demand_blocks(self) -> int:
        """Blocks the waiting requests need to start (`blocks_to_start`)."""
        return blocks_to_start(self.waiting, self.kv.block_size)

    def configure_swap(self, swapper: SwapExecutor, mode: str = "auto",
                       kv_reuse: bool = True) -> None:
        """Attach the copier of the swap space. ``mode`` "auto" swaps a preempted
        request only when its cost model estimates the copies to be cheaper than
        recomputing (else "swap": whenever host blocks are free); ``kv_reuse``
        keeps finished conversations' KV in host memory for their next turn. An
        asynchronous swapper's copy-ins overlap the step they are issued in, so
        their requests run from the next step."""
        self.kv.configure_swap(swapper, mode, kv_reuse)

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
        self.draft_outlooks.pop(request_id, None)
        (self.running if req.status is RequestStatus.RUNNING else self.waiting).remove(req)
        self.kv.free(request_id)
        self.kv.drop_host(request_id)
        return req

    def detach(self, request: Request) -> None:
        """Stop scheduling a running request without touching its blocks (it is
        being migrated); `attach` puts it back, here or on another instance. Its
        host copies (ids in this instance's swap space) are dropped."""
        self.running.remove(request)
        del self.requests[request.request_id]
        self.draft_outlooks.pop(request.request_id, None)
        self.kv.drop_host(request.request_id)

    def attach(self, request: Request, index: int | None = None,
               num_computed_tokens: int | None = None) -> None:
        """Run a request whose KV is already in this instance's blocks; with
        ``num_computed_tokens`` (a request adopted from another instance), that
        many of its tokens' KV was written into them (full blocks enter the
        prefix cache)."""
        if num_computed_tokens is not None:
            request.num_computed_tokens = num_computed_tokens
            self.kv.commit(request)
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
            if row.draft:
                try:
                    self._accept(req, row, output.spec_token_ids[i], now)
                except Exception as error:
                    log.exception("request %s failed after sampling", req.parent_id)
                    broken.append((req, error))
                    continue
                sampled.append(req)
                continue
            if output.prompt_logprobs is not None and output.prompt_logprobs[i] is not None:
                self._record_prompt(req, *output.prompt_logprobs[i])
            samples = req.samples(row.num_new_tokens)
            req.num_computed_tokens += row.num_new_tokens
            self.kv.commit(req)
            if not samples:
                continue  # a prefill chunk that does not finish the prompt
            try:
                self._record(req, (tokens[i], output.logprobs[i], output.top_ids[i],
                                   output.top_logprobs[i]), now)
            except Exception as error:
                log.exception("request %s failed after sampling", req.parent_id)
                broken.append((req, error))
                continue
            sampled.append(req)
        return sampled, broken

    def _record(self, req: Request, sample: Sample, now: float) -> None:
        """Append a token sampled for ``req``, then finish it if it is done."""
        self._append(req, sample, now)
        if req.is_finished:
            self._finish(req)

    @staticmethod
    def _append(req: Request, sample: Sample, now: float) -> None:
        """Append a sampled token with its log-probs (only if it was appended: a
        grammar may refuse it): the one place a sampled token enters a request."""
        token, logprob, top_ids, top_logprobs = sample
        token = int(token)
        before = len(req.output_token_ids)
        req.append_token(token, now)
        if req.params.logprobs is not None and len(req.output_token_ids) > before:
            k = req.params.logprobs
            top = {int(t): float(lp) for t, lp in zip(top_ids[:k], top_logprobs[:k])}
            req.logprobs.append(TokenLogprobs(token, float(logprob), top))

    def _accept(self, req: Request, row: ScheduledRow, targets: tuple[np.ndarray, ...],
                now: float) -> None:
        """Verify a row's draft against ``targets`` (the sampler's token ids, log-probs,
        top ids and top log-probs at each of the row's positions): the draft
        tokens the target sampled too, then the target's token after them, are
        appended, up to where the request finishes (`sluice.runtime.spec_decode`:
        for greedy rows the argmax, for sampled ones the rejection rule). Only
        the KV of the accepted positions counts as computed (the rest is
        overwritten later), and the request keeps only the blocks its tokens
        need: those reserved for rejected positions go back to the pool now."""
        tokens = targets[0]
        accepted = 0
        while accepted < len(row.draft) and tokens[accepted] == row.draft[accepted]:
            accepted += 1
        self.spec_stats.record(len(row.draft), accepted)
        self.draft_outlooks[req.request_id].observe(accepted)
        for j in range(accepted + 1):
            self._append(req, tuple(a[j] for a in targets), now)
            if req.is_finished:
                break
        # the KV of every token but the newest (sampled, not yet fed) is written
        req.num_computed_tokens = req.num_tokens - 1
        self.kv.commit(req)
        if req.is_finished:
            self._finish(req)
        else:
            self.kv.truncate(req.request_id, req.num_tokens)

    @staticmethod
    def _record_prompt(req: Request, start: int, lps: list[TokenLogprobs]) -> None:
        """Record a prompt chunk's log-probs, with the request's number of alternatives."""
        k = req.params.prompt_logprobs
        req.add_prompt_logprobs(start, [
            TokenLogprobs(lp.token_id, lp.logprob, dict(list(lp.top.items())[:k]))
            for lp in lps])

    def _finish(self, request: Request) -> None:
        self.running.remove(request)
        del self.requests[request.request_id]
        self.draft_outlooks.pop(request.request_id, None)
        self.kv.save_conversation(request)
        self.kv.free(request.request_id)

    def reserve_blocks(self, seq_id: str, num_blocks: int) -> list[int] | None:
        """Device blocks for the first ``num_blocks`` blocks of a sequence whose KV
        is copied in from another instance (`KVCacheManager.reserve`)."""
        return self.kv.reserve(seq_id, num_blocks)

    def free_blocks(self, seq_id: str) -> None:
        """Free the blocks of a sequence this scheduler does not run (detached
        for migration, or reserved for one that will not land)."""
        self.kv.free(seq_id)

    def movable(self, request: Request) -> bool:
        """Whether the request runs here on device KV (it could migrate)."""
        return (request.status is RequestStatus.RUNNING and not self.kv.is_swapped(
            request.request_id) and self.requests.get(request.request_id) is request)

    def swap_out_failed(self, copy: SwapCopy) -> None:
        """A swap-out copy did not happen: the request recomputes instead."""
        req = self.requests[copy[0]]
        self.kv.drop_host(req.request_id)
        req.num_computed_tokens = 0

    def swap_in_failed(self, copy: SwapCopy) -> None:
        """A swap-in copy did not happen: the request recomputes from the start
        (its table stays; recompute rewrites it)."""
        req = self.requests[copy[0]]
        self.kv.copy_in_failed(req)
        req.num_computed_tokens = 0

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
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
        drafts = self._add_drafts(scheduled)
        self.policy.account(scheduled)
        return self._output(scheduled, displaced + preempted, drafts)

    def _add_drafts(self, scheduled: list[tuple[Request, int]]) -> dict[str, list[int]]:
        """Speculative decoding (`sluice.runtime.spec_decode`): give scheduled
        decodes of requests that may draft their n-gram draft as extra tokens,
        with what the step's token budget and prompt-chunk cap leave once every
        other row is scheduled (a drafted row runs in the prompt group), only
        where its KV blocks are free without preempting anyone, and, in a step
        of decodes only, only if the drafts pay for making it a mixed step
        (`spec_decode.drafts_pay`). Not in a step
        that scores a prompt (its program samples one row per chunk). Returns
        the drafts by request id (``scheduled`` is updated in place)."""
        k = self.num_speculative_tokens
        if not k or any(r.needs_prompt_logprobs for r, _ in scheduled):
            return {}
        budget = self.max_num_batched_tokens - sum(n for _, n in scheduled)
        prefills = sum(not r.is_decode(n) for r, n in scheduled)
        proposed: list[tuple[int, list[int], DraftOutlook]] = []
        for i, (req, n) in enumerate(scheduled):
            if budget <= 0 or prefills + len(proposed) >= self.max_prefill_seqs:
                break
            if not req.is_decode(n) or not may_draft(req):
                continue
            room = min(k, budget, req.max_tokens - len(req.output_token_ids) - 1)
            outlook = self.draft_outlooks.setdefault(req.request_id, DraftOutlook.first(room))
            if draft := draft_for(req, room, outlook):
                proposed.append((i, draft, outlook))
                budget -= len(draft)
        if not prefills and not drafts_pay([(d, o) for _, d, o in proposed], len(scheduled)):
            for i, draft, outlook in proposed:  # a plain decode step: they wait and learn
                outlook.hold(len(scheduled[i][0].output_token_ids), draft)
            return {}
        drafts: dict[str, list[int]] = {}
        for i, draft, _ in proposed:
            req, n = scheduled[i]
            if self.kv.allocate(req.request_id, req.num_tokens + len(draft)):
                drafts[req.request_id] = draft
                scheduled[i] = (req, n + len(draft))
        return drafts

    def _output(self, scheduled: list[tuple[Request, int]], preempted: list[Request],
                drafts: dict[str, list[int]] | None = None) -> SchedulerOutput:
        """The step as plain data; marks the requests' first scheduling."""
        now = time.monotonic()
        rows, prefill = [], 0
        for req, n in scheduled:
            rows.append(ScheduledRow(req.request_id, n, req.num_computed_tokens,
                                     self.kv.block_table(req.request_id),
                                     (drafts or {}).get(req.request_id, [])))
            prefill += 0 if req.is_decode(n) else n
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
        swap_out, swap_in, release = self.kv.take_copies()
        return SchedulerOutput(rows, [r.request_id for r in preempted],
                               sum(n for _, n in scheduled), prefill, swap_out, swap_in,
                               release, self.kv.overlap_swap_in)

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
            need = self.kv.blocks_to_admit(head, self.max_num_batched_tokens)
            if len(self.running) < self.max_num_seqs and need <= self.kv.num_free_blocks:
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
        while not self.kv.allocate(req.request_id, req.num_computed_tokens + n):
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
        # on shortage of host blocks, requests that keep host copies only for reuse
        # give them up: waiting ones first, then running ones, latest admitted first
        if self.kv.swap_out(req, self.waiting + self.running[::-1]):
            self.num_swap_outs += 1
        else:
            req.num_computed_tokens = 0  # its host copies, if any, stay for the resume
            self.num_recomputes += 1
        self.kv.free(req.request_id)
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        req.waiting_since = self.policy.clock()
        self.waiting.insert(0, req)
        self.num_preemptions += 1

    def _begin(self, req: Request) -> list[int] | None:
        """Start a request on the KV cache (`KVCacheManager.begin`): a swapped one
        keeps its computed tokens (they come back from host memory), others
        start from their prefix hits, or from host copies that extend them
        (returned; their copy-in is queued once the request gets its blocks)."""
        if self.kv.is_swapped(req.request_id):
            self.kv.begin(req)
            return None
        req.num_cached_tokens, host = self.kv.begin(req)
        req.num_computed_tokens = req.num_cached_tokens
        if host is not None:
            req.num_computed_tokens = len(host) * self.kv.block_size
        return host

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
            swapped = self.kv.is_swapped(req.request_id)
            reuse = self._begin(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv.allocate(req.request_id, req.num_computed_tokens + n):
                self.kv.free(req.request_id)
                if not swapped:
                    req.num_computed_tokens = 0
                break
            if swapped:
                self.kv.swap_in(req)
            elif reuse is not None:
                self.kv.reuse_in(req, reuse)
                self.num_reused_blocks += len(reuse) - req.num_cached_tokens // self.kv.block_size
                req.num_cached_tokens = len(reuse) * self.kv.block_size
            self.waiting.remove(req)
            self.running.append(req)
            req.status = RequestStatus.RUNNING
            req.running_since = self.policy.clock()
            # A request whose copy-in overlaps this step runs from the next one; it
            # still takes its share of this step's limits, so a step starts no more
            # copy-ins than it could have run.
            if not (self.kv.overlap_swap_in and self.kv.swapping_in(req.request_id)):
                scheduled.append((req, n))
            budget -= n
            prefills += 1

    def _may_fit(self, req: Request, budget: int) -> bool:
        """Cheap read-only check before `begin`, so a request that cannot get its
        blocks is not admitted and rolled back (and counted as a cache query) every step."""
        return self.kv.blocks_to_admit(req, budget) <= self.kv.num_free_blocks

    def _room_by_displacing(self, head: Request, need: int, movable: list[Request]) -> bool:
        """Whether displacing every request of ``movable`` that ``head`` outranks
        would free the ``need`` blocks it lacks (at most: shared blocks may stay in use)."""
        outranked = [r for r in movable if self.policy.outranks(head, r)]
        freed = sum(len(self.kv.block_table(r.request_id)) for r in outranked)
        return need <= self.kv.num_free_blocks + freed
