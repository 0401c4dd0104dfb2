"""The engine: one step = ``sched = scheduler.schedule()`` (plain data: which
rows, how many tokens, which blocks, which swap copies) -> ``execute(sched)``
(the copies, one ragged batch through one jitted forward, sampling: a
`ModelOutput`) -> ``scheduler.update_from_output(sched, output)`` (the
scheduler records tokens, advances progress, commits prefix-cache blocks,
finishes requests); then the engine builds the outputs of the requests that
advanced.

Interface (used by `LLM`, `AsyncEngine` and the server):

- ``prepare(request_id, prompt, params, ...) -> Group``: validate and tokenize
  (raises ``ValueError`` naming the field; queues nothing);
- ``enqueue(group)``, or ``add_request(...)`` = prepare + enqueue;
- ``step() -> list[RequestOutput]``: outputs of the requests that advanced. A
  step that raises is re-run in parts (bisection) to find the requests that fail
  on their own; only those fail (their final output's ``error`` says why, their
  blocks are freed), and every other request advances exactly as it would have.
  `EngineDeadError` only if the KV pool itself is lost (then for good);
- ``abort_request(request_id)``: unknown ids are a no-op;
- ``set_priority(request_id, priority)``: re-rank a request at runtime;
- ``stats() -> EngineStats``;
- ``migration``: the `MigrationEndpoint` that moves running requests (KV and
  state) between engines (`sluice.runtime.migration`); it works through the
  scheduler and the runner's block mover, not the engine;
- ``scheduler`` (and its ``kv`` manager), ``block_manager``: to read only.

``EngineConfig.device`` pins an engine to one JAX device (its own copy of the
parameters and its KV pool live there), so several engines can share a process.

The engine is single-threaded: call it from one thread (AsyncEngine does).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import jax
import numpy as np

from sluice.runtime.block_manager import BlockManager
from sluice.runtime.devices import default_device
from sluice.runtime.intake import Group, Intake, Prompt, check_priority
from sluice.runtime.kv_cache import KVCacheSpec, blocks_for, num_blocks_for_budget
from sluice.runtime.kv_manager import KVCacheManager
from sluice.runtime.loader import Model
from sluice.runtime.migration import MigrationEndpoint
from sluice.runtime.model_runner import ModelRunner, StepRow
from sluice.runtime.outputs import CompletionOutput, RequestMetrics, RequestOutput
from sluice.runtime.sampling_params import MAX_LOGPROBS, SamplingParams
from sluice.runtime.spec_decode import check_num_speculative_tokens
from sluice.runtime.structured_output import StructuredOutputManager
from sluice.runtime.swap import HostSwapSpace, SwapExecutor
from sluice.scheduler.local import LocalScheduler, ModelOutput, ScheduledRow, SchedulerOutput
from sluice.scheduler.policies import (OPTIONS, FairOptions, Policy, PriorityOptions,
                                       changed_options, make_policy)

log = logging.getLogger(__name__)

CPU_KV_CACHE_CAP = 2 << 30  # bytes; CPU pools default to what max_num_seqs full contexts need, at most this


@dataclasses.dataclass
class EngineConfig:
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_prefill_seqs: int = 4  # prompt chunks per step
    max_model_len: int | None = None  # default: the model's context, at most 2048
    kv_cache_memory: int | None = None  # bytes for the KV pool; default: see `_num_blocks`
    memory_fraction: float = 0.9  # of free accelerator memory, when kv_cache_memory is unset
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"  # fcfs | priority | fair (sluice.scheduler.policies)
    max_preemptions: int = 4  # times a request may be displaced by higher-priority work
    # the options of the priority and fair policies (sluice.scheduler.policies); those of
    # a policy the config does not name must stay at their defaults
    priority: PriorityOptions = dataclasses.field(default_factory=PriorityOptions)
    fair: FairOptions = dataclasses.field(default_factory=FairOptions)
    swap_space: int = 0  # bytes of host memory for swapped-out KV; 0 = preempt by recompute
    preemption_mode: str = "auto"  # with swap space: auto (cheaper of swap/recompute) | swap
    # swap-outs finish on a worker thread, swap-ins overlap a forward step: off the step
    async_swap: bool = True
    kv_reuse: bool = True  # finished conversations' KV stays in the swap space (multi-turn reuse)
    attention_backend: str = "pallas"  # kernels on GPU/TPU, the chunked pure-JAX path on CPU
    warmup: bool = True
    # with warmup: compile a covering set of the step programs before the engine is
    # built and the rest once the process is marked ready (`compiles.mark_ready`, which
    # a server does; without it steps stay padded to the covering set), see
    # `ModelRunner.warmup`; `sluice serve` sets it
    defer_warmup: bool = False
    seed: int | None = None  # draws seeds for unseeded requests; None = nondeterministic
    device: jax.Device | None = None  # the device the engine runs on; None = the default
    # n-gram speculative decoding (sluice.runtime.spec_decode): draft tokens per
    # decode row (greedy or sampled; not structured outputs), verified in one step; 0 = off
    num_speculative_tokens: int = 0


class EngineDeadError(RuntimeError):
    """The engine cannot step any more (its KV pool was lost); every request in it
    is lost. A multi-instance cluster replaces such an instance."""


@dataclasses.dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    num_free_blocks: int
    num_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    num_swapped: int = 0  # waiting requests whose KV is in host memory
    num_swap_outs: int = 0
    num_failed_requests: int = 0  # requests a failing step failed on their own
    # speculative decoding (sluice.runtime.spec_decode): drafts verified, their
    # tokens, and the tokens accepted
    num_spec_drafts: int = 0
    num_spec_draft_tokens: int = 0
    num_spec_accepted_tokens: int = 0


class LLMEngine:
    def __init__(self, model: Model, config: EngineConfig | None = None,
                 policy: Policy | None = None,
                 swap_executor: type[SwapExecutor] = SwapExecutor):
        """``policy``: a policy object instead of the one the config names (then the
        config's policy options must be at their defaults); ``swap_executor``: the
        class that runs swap copies (`bench/preemption.py` passes its baselines)."""
        self.config = config = config or EngineConfig()
        check_num_speculative_tokens(config.num_speculative_tokens)
        if config.device is not None:
            model = model.with_params(jax.device_put(model.params, config.device))
        self.model = model
        self.max_model_len = resolve_max_model_len(model, config)
        num_blocks = self._num_blocks()
        kv = KVCacheManager(BlockManager(num_blocks, config.block_size,
                                         config.enable_prefix_caching),
                            self._swap_space(num_blocks))
        self.scheduler = LocalScheduler(kv, config.max_num_seqs, config.max_num_batched_tokens,
                                        config.max_prefill_seqs, self._policy(policy),
                                        config.max_preemptions, config.num_speculative_tokens)
        self.runner = ModelRunner(model, num_blocks, config.block_size, config.max_num_seqs,
                                  config.max_num_batched_tokens, config.max_prefill_seqs,
                                  self.max_model_len, config.attention_backend,
                                  config.device, config.num_speculative_tokens)
        self.swapper = self._swap_executor(swap_executor)
        self.groups: dict[str, Group] = {}
        self.structured = StructuredOutputManager(model.tokenizer, model.config.vocab_size,
                                                  model.eos_token_ids, self.groups)
        self.migration = MigrationEndpoint(self.scheduler, self.runner, self.groups,
                                           model.tokenizer, self.structured)
        self.intake = make_intake(model, config)
        self.dead: str | None = None  # why the engine cannot step any more (`EngineDeadError`)
        self.num_failed_requests = 0  # requests failed alone by a step (`_isolate`)
        if config.warmup:
            self.runner.warmup(defer=config.defer_warmup)

    @property
    def block_manager(self) -> BlockManager:
        """The KV pool's bookkeeping, to read (the scheduler's KV manager owns it)."""
        return self.scheduler.kv.blocks

    def _num_blocks(self) -> int:
        c, cfg = self.config, self.model.config
        budget = c.kv_cache_memory
        if budget is None:
            budget = _free_device_memory(c.memory_fraction, c.device)
        if budget is None:  # CPU: enough for every sequence at full length, capped
            per_seq = KVCacheSpec.for_model(cfg, blocks_for(self.max_model_len, c.block_size),
                                            c.block_size, self.model.dtype, c.device)
            budget = min(CPU_KV_CACHE_CAP, c.max_num_seqs * per_seq.num_blocks
                         * per_seq.bytes_per_block)
        n = num_blocks_for_budget(cfg, budget, c.block_size, self.model.dtype, c.device)
        need = blocks_for(self.max_model_len, c.block_size)
        if n < need:
            raise ValueError(f"kv_cache_memory: {n} blocks cannot hold one sequence of "
                             f"max_model_len={self.max_model_len} ({need} blocks)")
        return n

    def _policy(self, policy: Policy | None) -> Policy:
        """The policy passed in, or the one the config names (with its options)."""
        options = {name: getattr(self.config, name) for name in OPTIONS}
        if policy is None:
            return make_policy(self.config.scheduling_policy, **options)
        for name, value in options.items():
            changed = changed_options(value)
            if changed:
                raise ValueError(f"{name}.{changed[0]}: set it on the policy passed in, not "
                                 "in the config (the config's options are for the policy "
                                 "it builds)")
        return policy

    def _swap_space(self, num_blocks: int) -> HostSwapSpace | None:
        if self.config.swap_space < 0:
            raise ValueError(f"swap_space: must be >= 0, got {self.config.swap_space}")
        if self.config.swap_space == 0:
            return None
        spec = KVCacheSpec.for_model(self.model.config, num_blocks, self.config.block_size,
                                     self.model.dtype, self.config.device)
        return HostSwapSpace.for_budget(spec, self.config.swap_space)

    def _swap_executor(self, cls: type[SwapExecutor]) -> SwapExecutor | None:
        c, space = self.config, self.scheduler.kv.host
        if c.preemption_mode not in ("auto", "swap"):
            raise ValueError(f"preemption_mode: must be 'auto' or 'swap', "
                             f"got {c.preemption_mode!r}")
        if space is None:
            return None
        swapper = cls(self.runner, space, c.async_swap)
        self.scheduler.configure_swap(swapper, c.preemption_mode, c.kv_reuse)
        return swapper

    # -- requests -------------------------------------------------------------

    def prepare(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None,
                priority: int = 0, client: str | None = None,
                conversation: str | None = None) -> Group:
        """Validate and tokenize a request without queueing it. ``conversation``
        keys multi-turn KV reuse (the next turn's prompt extends this one's)."""
        if request_id in self.groups:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        return self.intake.prepare(request_id, prompt, params, priority, client,
                                   conversation=conversation)

    def enqueue(self, group: Group) -> None:
        if group.request_id in self.groups:
            raise ValueError(f"request_id: {group.request_id!r} is already in use")
        self.groups[group.request_id] = group
        self.structured.admit(group.requests)
        for req in group.requests:
            if not req.is_finished:  # a re-dispatched group may carry finished siblings
                self.scheduler.add(req)

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None,
                    priority: int = 0, client: str | None = None,
                    conversation: str | None = None) -> None:
        self.enqueue(self.prepare(request_id, prompt, params, priority, client, conversation))

    def abort_request(self, request_id: str) -> None:
        """Abort a request (all its completions) and free its blocks; unknown ids: no-op."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return
        now = time.monotonic()
        for req in group.requests:
            if not req.is_finished:
                if self.scheduler.abort(req.request_id) is None:
                    self.migration.forget(request_id)  # suspended mid-migration
                req.abort(now)

    def set_priority(self, request_id: str, priority: int) -> None:
        """Change a request's priority while it waits or runs (an admin call); the
        scheduler acts on it from the next step. Unknown ids: no-op."""
        check_priority(priority)
        group = self.groups.get(request_id)
        for req in group.requests if group else ():
            req.priority = priority

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    # -- the step -------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One step (module docstring): ``schedule`` -> `execute` ->
        ``update_from_output``. A forward or sampling pass that raises does
        not fail its batch: `_isolate` finds the rows that fail on their own and
        fails only their requests (their final output carries ``error``); the
        rest advance as if nothing happened. Raises `EngineDeadError` when the
        engine cannot go on (its KV pool is lost), and from then on; a failed
        synchronous swap copy still raises (the swapper has already handed its
        requests back to recompute)."""
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        sched = self.scheduler.schedule()
        failed: dict[str, Exception] = {}  # group id -> why it failed
        output = self.execute(sched, failed)
        if output is None:
            return []
        sampled, broken = self.scheduler.update_from_output(sched, output)
        for req, error in broken:  # its own tokens or text broke it
            failed.setdefault(req.parent_id, error)
        touched = {r.parent_id: self.groups[r.parent_id] for r in sampled}
        outputs = [self._output(g) for rid, g in touched.items() if rid not in failed]
        return outputs + [self._fail(rid, error) for rid, error in failed.items()]

    def execute(self, sched: SchedulerOutput, failed: dict[str, Exception]
                ) -> ModelOutput | None:
        """Run a scheduled step: its swap copies and its rows' forward and
        sampling; None if it runs no rows. Requests whose rows fail the step on
        their own go into ``failed`` (group id -> error) and are left out of the
        output."""
        if sched.swap_in_overlaps and sched.rows and sched.swap_in:
            return self._run_rows(sched.rows, failed,
                                  lambda: self._execute_overlapping_swap_in(sched), sched)
        self._swap(sched)
        if not sched.rows:
            return None
        return self._run_rows(sched.rows, failed, sched=sched)

    def _run_rows(self, rows: list[ScheduledRow], failed: dict[str, Exception],
                  first_try: Callable[[], tuple[np.ndarray, ...]] | None = None,
                  sched: SchedulerOutput | None = None) -> ModelOutput:
        """Execute ``rows`` (``first_try`` runs them the first time, e.g. with
        swap-ins overlapping; ``sched``: the whole step, timed for the swap cost
        model); on failure `_isolate` them. Requests that failed alone go into
        ``failed``."""
        try:
            out = first_try() if first_try is not None else self._execute(rows, sched=sched)
        except Exception as error:
            return self._isolate(rows, error, failed)
        return ModelOutput(rows, *out)

    def _isolate(self, rows: list[ScheduledRow], error: Exception,
                 failed: dict[str, Exception]) -> ModelOutput:
        """Find the rows of a failed step that fail on their own: the step is re-run
        once (a transient fault then fails no one), then by bisection, each
        failing part re-run as two halves until a failing part is one row run
        alone, whose request is the culprit. One culprit among n rows costs about
        2 log2(n) re-runs. Re-running is safe: a step changes no request state
        until it returns, and rewrites the same KV slots with the same values."""
        log.warning("engine step of %d rows failed (%s: %s); re-running it to find the "
                    "culprit", len(rows), type(error).__name__, error)
        self._check_alive(error)
        try:
            out = self._execute(rows)
        except Exception as e:
            self._check_alive(e)
            error = e
        else:
            return ModelOutput(rows, *out)
        ran: list[ScheduledRow] = []
        results: list[tuple[np.ndarray, ...]] = []
        parts = [(rows, error)]
        while parts:
            part, err = parts.pop()
            if len(part) == 1:
                req = self.scheduler.requests[part[0].request_id]
                log.error("request %s fails the engine step on its own: %s: %s",
                          req.parent_id, type(err).__name__, err)
                failed.setdefault(req.parent_id, err)
                continue
            for half in (part[:len(part) // 2], part[len(part) // 2:]):
                try:
                    out = self._execute(half)
                except Exception as e:
                    self._check_alive(e)
                    parts.append((half, e))
                else:
                    ran.extend(half)
                    results.append(out)
        return ModelOutput(ran, *_concat_rows(results))

    def _check_alive(self, error: Exception) -> None:
        """Raise `EngineDeadError` (for good) if the KV pool did not survive ``error``
        (a donated buffer deleted, or a device error poisoning it): every request
        is lost then, and no re-run can help."""
        try:
            leaves = jax.tree_util.tree_leaves(self.runner.kv_cache)
            intact = not any(x.is_deleted() for x in leaves)
            if intact:
                jax.block_until_ready(leaves)
        except Exception:
            intact = False
        if not intact:
            self.dead = f"the KV pool was lost in a failed step ({type(error).__name__}: {error})"
            log.error("engine dead: %s", self.dead)
            raise EngineDeadError(self.dead) from error

    def _fail(self, request_id: str, error: Exception) -> RequestOutput:
        """End a request (all its completions) that failed on its own: its blocks
        are freed and its final output carries the error."""
        group = self.groups[request_id]
        now = time.monotonic()
        for req in group.requests:
            if not req.is_finished:
                self.scheduler.abort(req.request_id)
                req.abort(now)
        self.num_failed_requests += 1
        out = self._output(group)
        out.error = f"the engine failed this request ({type(error).__name__}: {error})"
        return out

    def _execute(self, rows: list[ScheduledRow],
                 during: Callable[[jax.Array], None] | None = None,
                 sched: SchedulerOutput | None = None) -> tuple[np.ndarray, ...]:
        """Run ``rows``; ``during`` as in `ModelRunner.execute`. With ``sched`` (the
        whole step, first try, no copies inside) the step is timed for the swap
        cost model."""
        now = time.monotonic()
        requests = self.scheduler.requests
        batch = [StepRow(requests[r.request_id], r.num_new_tokens, r.block_table, r.draft)
                 for r in rows]
        # grammar masks of the rows that sample, computed while the forward runs (the
        # matchers catch up with their requests' outputs: the same masks on a re-run);
        # None while no constrained request is live
        out = self.runner.execute(batch, during, self.structured.token_masks(batch))
        if self.swapper is not None and during is None and sched is not None:
            # per-token compute time, for swap-vs-recompute estimates
            self.swapper.cost.observe_step(sched.num_tokens, sched.num_prefill_tokens,
                                           time.monotonic() - now)
        return out

    def _execute_overlapping_swap_in(self, sched: SchedulerOutput) -> tuple[np.ndarray, ...]:
        """Swap-outs, then the step with the swap-ins issued while it runs. If
        anything fails before the swap-ins were handed to the copier, they are
        failed here (their requests recompute; the host references drop), so a
        request never runs on KV that was not copied in."""
        issued = False

        def during(busy: jax.Array) -> None:
            nonlocal issued
            issued = True  # from here on the copier handles its own failures
            self._swap(sched, outs=False, behind=busy)

        try:
            self._swap(sched, ins=False)
            return self._execute(sched.rows, during)
        except BaseException:
            if not issued:
                self.swapper.abandon(sched.swap_in, sched.host_release,
                                     self.scheduler.swap_in_failed)
            raise

    def _swap(self, sched: SchedulerOutput, outs: bool = True, ins: bool = True,
              behind: jax.Array | None = None) -> None:
        """Move the step's swapped KV (`SwapExecutor.run`): outs before the
        forward; ins then too, or, when they overlap the step, from inside it
        (``behind`` = its output). A failed copy is handed back to the scheduler,
        so no host block leaks and no KV is trusted unstored."""
        if self.swapper is not None:
            self.swapper.run(sched.swap_out if outs else [], sched.swap_in if ins else [],
                             sched.host_release if ins else [], self.scheduler.swap_out_failed,
                             self.scheduler.swap_in_failed, behind)

    def _output(self, group: Group) -> RequestOutput:
        finished = group.finished
        if finished:
            del self.groups[group.request_id]
        if group.delta_outputs and not group.sent:
            group.sent = [0] * len(group.requests)
        completions, metrics = [], []
        for i, r in enumerate(group.requests):
            delta = r.detokenizer.take_delta(finished=r.is_finished)
            r.emitted_text += delta
            # a delta output holds what is new since the group's previous output;
            # a cumulative one, copies of everything so far
            start = group.sent[i] if group.delta_outputs else 0
            if group.delta_outputs:
                group.sent[i] = len(r.output_token_ids)
            completions.append(CompletionOutput(
                r.index, delta if group.delta_outputs else r.emitted_text,
                r.output_token_ids[start:],
                r.logprobs[start:] if r.params.logprobs is not None else None,
                r.finish_reason, r.stop_reason, delta))
            metrics.append(RequestMetrics(r.arrival_time, r.first_scheduled_time,
                                          r.first_token_time, r.token_times[start:],
                                          r.finished_time, r.num_preemptions,
                                          r.num_cached_tokens))
        first = group.requests[0]
        prompt_ids = first.prompt_token_ids if group.delta_outputs \
            else list(first.prompt_token_ids)
        return RequestOutput(group.request_id, group.prompt, prompt_ids, completions, finished,
                             metrics, group.delta_outputs,
                             prompt_logprobs=group.output_prompt_logprobs())

    def stats(self) -> EngineStats:
        bm, sched = self.block_manager, self.scheduler
        spec = sched.spec_stats
        return EngineStats(sched.num_running, sched.num_waiting, bm.usage,
                           bm.num_free_blocks, bm.num_blocks, bm.prefix_cache_queries,
                           bm.prefix_cache_hits, sched.num_preemptions, sched.kv.num_swapped,
                           sched.num_swap_outs, self.num_failed_requests, spec.num_drafts,
                           spec.num_draft_tokens, spec.num_accepted_tokens)


def _concat_rows(parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """One (tokens, logprobs, top ids, top logprobs, prompt logprobs, draft targets)
    from the parts' rows, in order (every part's top log-probs are `MAX_LOGPROBS` wide)."""
    if not parts:
        return (np.zeros(0, np.int32), np.zeros(0, np.float32),
                np.zeros((0, MAX_LOGPROBS), np.int32), np.zeros((0, MAX_LOGPROBS), np.float32),
                np.zeros(0, object), np.zeros(0, object))
    return tuple(np.concatenate(arrays) for arrays in zip(*parts))


def make_intake(model: Model, config: EngineConfig) -> Intake:
    """The intake that validates and tokenizes requests for engines with ``config``:
    the engine's own, and the global scheduler's (which builds requests before
    dispatch)."""
    return Intake(model, resolve_max_model_len(model, config), config.seed)


def resolve_max_model_len(model: Model, config: EngineConfig) -> int:
    """The context limit an engine with ``config`` serves (validated)."""
    limit = model.config.max_position_embeddings
    if config.max_model_len is None:
        return min(limit, 2048)
    if not 1 < config.max_model_len <= limit:
        raise ValueError(f"max_model_len: must be in (1, {limit}], got {config.max_model_len}")
    return config.max_model_len


def _free_device_memory(fraction: float, device: jax.Device | None) -> int | None:
    """Bytes of ``device``'s memory (None: JAX's default device) to use for the pool;
    None on CPU."""
    dev = device if device is not None else default_device()
    if dev.platform == "cpu":
        return None
    stats = dev.memory_stats() or {}
    limit, used = stats.get("bytes_limit"), stats.get("bytes_in_use", 0)
    if not limit:
        return None
    return int((limit - used) * fraction)
