"""Preemption benchmark (issue 6): what context switches cost, and what that
does to latency and fairness, Sluice's design vs the common one, in one run.

Two parts, both on CPU by default (``--part micro|workload|all``):

micro: swap-out + swap-in of one request's KV (default 2048 tokens of
`smollm2-135m-random`): the runtime's `SwapExecutor` (the sequence's
contiguous runs as a few power-of-two slices through the model runner's block
mover) vs two baselines defined here, `PerBlockSwapExecutor` (one
synchronous copy per block, all its layers at once, as Sluice's block-major
pool allows) and `PerLayerBlockSwapExecutor` (one copy per block, layer and
K/V, all issued before waiting: the copy granularity of per-block swapping
over one cache per layer, as in vLLM v0's ``swap_blocks``); plus the block
mover itself (`ModelRunner.copy_out` / `copy_in`, one group) for reference. Each is timed
over several repeats after a warm-up; the restored bytes are checked. Also one
forward step with the request's swap-in issued before it (synchronous) vs
while it runs (asynchronous, as the engine does).

workload: multi-turn conversations through the real engine (built-in ``tiny``
model): synthetic ShareGPT-like lengths (log-normal user messages and replies,
1 + Poisson(4) turns, so 5 on average), Poisson conversation arrivals, a
think time between turns, and per-client priorities that are reshuffled every
``--priority-every`` engine steps (`LLMEngine.set_priority` on live requests).
The KV pool is small, so the priority changes and memory pressure preempt
often. Configurations, one after another in the same process on the same
workload (same seeds):

- ``baseline``: the common design: per-block synchronous swap copies
  (`PerBlockSwapExecutor`: one per block of the block-major pool, the kinder
  of the two per-block baselines), always
  swap while host space lasts, no KV reuse across turns, swapped-out requests
  resume in FCFS (arrival) order ahead of the rest;
- ``sluice``: block-group copies, device->host copies on a worker thread,
  host->device copies issued while a forward step runs,
  swap-vs-recompute chosen per request from measured costs, multi-turn KV reuse
  in the host swap space, and `PriorityPolicy(aging_s=--aging,
  resume_deadline_s=0, displace_streaming=False)`: priority order with aging
  for admission, a turn paused mid-generation resumes first, and only turns
  that have not streamed a token yet are displaced for higher priority;
- ``sluice-displace-streaming``: as ``sluice``, but streaming turns may be
  displaced too (isolates that choice);
- ``sluice-deadline``: Sluice's mechanisms, strict priority with a resume
  deadline (``--resume-deadline``; a turn paused mid-generation that has waited
  that long resumes first);
- ``sluice-strict``: Sluice's mechanisms, strict priority;
- ``sluice-fcfs-resume``: Sluice's mechanisms with the baseline's resumption
  order (separates the mechanisms from the scheduling order);
- ``sluice-fair``: Sluice's mechanisms under the fair (virtual token counter)
  policy, to check the fairness gap against its bound;
- ``sluice-sync-swap``: as ``sluice`` with synchronous swaps (isolates
  asynchronous swapping).

Reported per configuration: P50/P95/P99/P99.9 TTFT and time between tokens,
throughput, context switches (preemptions, swap-outs, swap-ins, recomputes),
bytes copied, engine-thread time stalled in copies, and per-client service
(max difference in service between two clients while both are backlogged,
against the VTC bound). Writes bench/results/preemption*.json and a plot.

    .venv/bin/python bench/preemption.py --part all [--configs baseline,sluice,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

from sluice.runtime.engine import EngineConfig, LLMEngine
from sluice.runtime.kv_cache import KVCacheSpec
from sluice.runtime.intake import Intake
from sluice.runtime.loader import load_model
from sluice.runtime.model_runner import ModelRunner, StepRow
from sluice.runtime.request import Request
from sluice.runtime.sampling_params import SamplingParams
from sluice.runtime.swap import HostSwapSpace, SwapExecutor
from sluice.scheduler.policies import FairPolicy, PriorityPolicy

RESULTS = Path(__file__).parent / "results"
W_IN, W_OUT = FairPolicy.W_IN, FairPolicy.W_OUT  # service weights of the fairness gap


def machine() -> dict:
    return {"cpu_cores": os.cpu_count(), "jax_cpu_devices": jax.local_device_count("cpu"),
            "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__,
            "backend": jax.default_backend()}


# -- the copy-granularity baselines ---------------------------------------------------


class PerBlockSwapExecutor(SwapExecutor):
    """Baseline: one synchronous copy per block (all its layers: the pool is
    block-major) through the runner's block mover; each copy completes before
    the next is issued."""

    def split(self, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return [(start + i, 1) for start, length in runs for i in range(length)]

    def issue_out(self, pieces: list[tuple[int, int]], host: list[int]) -> None:
        self.store(host, (self.runner.gather([piece]) for piece in pieces))  # lazily

    def issue_in(self, pieces: list[tuple[int, int]], host: list[int]) -> None:
        for (start, _), h in zip(pieces, host):
            self.runner.copy_in([(start, 1)], self.space.load([h]))
            jax.block_until_ready(self.runner.kv_cache)


@jax.jit
def _slice_layer(cache: jax.Array, block: jax.Array, layer: jax.Array, kv: jax.Array) -> jax.Array:
    """The K or V (``kv``) of one layer of one block."""
    return jax.lax.dynamic_slice(cache, (block, layer, kv, 0, 0, 0), (1, 1, 1) + cache.shape[3:])


@functools.partial(jax.jit, donate_argnums=0)
def _update_layer(cache: jax.Array, block: jax.Array, layer: jax.Array, kv: jax.Array,
                  part: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice(cache, part.astype(cache.dtype),
                                        (block, layer, kv, 0, 0, 0))


class PerLayerBlockSwapExecutor(PerBlockSwapExecutor):
    """Baseline: one copy per block, layer and K/V, all of a swap's copies issued
    before waiting for them (as queued ``cudaMemcpyAsync`` calls are), the
    granularity of swapping over one cache per layer."""

    @property
    def copies_per_piece(self) -> int:
        layers, halves = self.space.blocks.shape[1:3]
        return layers * halves

    def _parts(self, pieces: list[tuple[int, int]], host: list[int]):
        """(host block, device block, layer, K or V) of each copy, in order."""
        layers, halves = self.space.blocks.shape[1:3]
        for h, (b, _) in zip(host, pieces):
            for layer in range(layers):
                for half in range(halves):
                    yield h, b, layer, half

    def issue_out(self, pieces: list[tuple[int, int]], host: list[int]) -> None:
        t0 = time.perf_counter()
        kv = self.runner.kv_cache
        parts = list(self._parts(pieces, host))
        staged = [_slice_layer(kv, b, layer, half) for _, b, layer, half in parts]
        for (h, _, layer, half), a in zip(parts, staged):
            self.space.blocks[h, layer, half] = np.asarray(a)[0, 0, 0]
        self.cost.observe_copy(len(host) * self.space.bytes_per_block, time.perf_counter() - t0)

    def issue_in(self, pieces: list[tuple[int, int]], host: list[int]) -> None:
        for h, b, layer, half in self._parts(pieces, host):  # all issued, then waited for once
            part = self.space.blocks[h, layer, half][None, None, None].copy()
            if self.runner.device is not None:
                part = jax.device_put(part, self.runner.device)
            self.runner.kv_cache = _update_layer(self.runner.kv_cache, b, layer, half, part)
        jax.block_until_ready(self.runner.kv_cache)


# the runtime's copy path and the baselines, by the name results report them under
EXECUTORS = {"grouped": SwapExecutor, "per_block": PerBlockSwapExecutor,
             "per_layer_block": PerLayerBlockSwapExecutor}


# -- micro: one context switch -------------------------------------------------------


def micro(args) -> dict:
    runs = [micro_one(args, name) for name in args.micro_models.split(",")]
    return {"command": f"bench/preemption.py --part micro --tokens {args.tokens} "
                       f"--repeats {args.repeats} --micro-models {args.micro_models}",
            "machine": machine(), "results": runs}


def micro_one(args, model_name: str) -> dict:
    model = load_model(model_name, progress=False)
    block_size = 16
    n = -(-args.tokens // block_size)
    runner = ModelRunner(model, 2 * n, block_size, max_num_seqs=1, max_num_batched_tokens=16,
                         max_prefill_seqs=1, max_model_len=args.tokens)
    rng = np.random.default_rng(0)
    runner.kv_cache = jax.numpy.asarray(rng.standard_normal(runner.spec.shape, np.float32)
                                        .astype(runner.spec.dtype))
    before = np.asarray(runner.kv_cache[:n])
    space = HostSwapSpace(runner.spec, n)
    runs, host = [(0, n)], list(range(n))
    executors = {mode: cls(runner, space, asynchronous=False)
                 for mode, cls in EXECUTORS.items()}

    def executor_switch(mode: str) -> float:
        start = time.perf_counter()
        executors[mode].run([(None, runs, host)], [(None, runs, host)])
        return time.perf_counter() - start

    def primitive_switch() -> float:  # the gather/scatter primitive, one group
        start = time.perf_counter()
        runner.copy_in(runs, runner.copy_out(runs))
        runner.kv_cache.block_until_ready()
        return time.perf_counter() - start

    paths = {m: functools.partial(executor_switch, m) for m in EXECUTORS}
    paths["gather_scatter_primitive"] = primitive_switch
    for f in paths.values():  # warm-up compiles every copy shape
        f()
    calls = {m: e.stats.copy_calls // 2 for m, e in executors.items()}  # of the warm-up
    times = {k: [] for k in paths}
    for _ in range(args.repeats):
        for k, f in paths.items():
            times[k].append(f())
    assert np.array_equal(np.asarray(runner.kv_cache[:n]), before), "copies changed the KV"
    best = {k: min(v) for k, v in times.items()}
    nbytes = n * runner.spec.bytes_per_block
    return {
        "model": model_name, "tokens": args.tokens, "blocks": n,
        "bytes": nbytes, "best_s": best, "all_s": times,
        "copy_calls_each_way": calls,
        "speedup_grouped_vs_per_block": best["per_block"] / best["grouped"],
        "speedup_grouped_vs_per_layer_block": best["per_layer_block"] / best["grouped"],
        "grouped_GBps_both_directions": 2 * nbytes / best["grouped"] / 1e9,
        "swap_in_overlap": swap_in_overlap(args, model, runner, space, runs, host, before),
    }


def swap_in_overlap(args, model, runner: ModelRunner, space: HostSwapSpace, runs, host,
                    before: np.ndarray) -> dict:
    """One forward step (a 16-token prompt chunk in blocks the swap does not touch)
    with the grouped swap-in of the request: issued before the step and waited
    for (synchronous) vs issued while the step runs (asynchronous, as the engine
    does), against the step alone and the swap-in alone. Best of ``--repeats``;
    the swapped-in bytes are checked against ``before``."""
    n = len(host)
    req = Intake(model, args.tokens, 0).prepare(
        "step", {"prompt_token_ids": [1] * 16}, SamplingParams(max_tokens=1)).requests[0]
    rows = [StepRow(req, 16, [n])]
    ex = SwapExecutor(runner, space, asynchronous=True)
    ins = [(None, runs, host)]

    def timed(f) -> float:
        start = time.perf_counter()
        f()
        jax.block_until_ready(runner.kv_cache)
        return time.perf_counter() - start

    paths = {
        "step": lambda: runner.execute(rows),
        "swap_in": lambda: ex.run([], ins),
        "synchronous": lambda: (ex.run([], ins), runner.execute(rows)),
        "overlapped": lambda: runner.execute(rows, lambda busy: ex.run([], ins, behind=busy)),
    }
    for f in paths.values():  # warm-up
        timed(f)
    best = {k: min(timed(f) for _ in range(args.repeats)) for k, f in paths.items()}
    runner.kv_cache = runner.kv_cache.at[:n].set(0)  # so a copy that did nothing shows
    paths["overlapped"]()
    ex.close()
    assert np.array_equal(np.asarray(runner.kv_cache[:n]), before), "swap-in changed the KV"
    hidden = (best["synchronous"] - best["overlapped"]) / best["swap_in"]
    return {"best_s": best, "share_of_swap_in_hidden": hidden}


# -- workload: multi-turn conversations -----------------------------------------------


@dataclasses.dataclass
class Conversation:
    cid: str
    client: str
    start: float  # arrival offset of the first turn, seconds
    user: list[list[int]]  # token ids of each user message
    replies: list[int]  # max tokens of each reply
    think: list[float]  # pause after each reply before the next turn, seconds


def make_workload(args, vocab: int) -> list[Conversation]:
    rng = np.random.default_rng(args.seed)
    convs, t = [], 0.0
    for i in range(args.conversations):
        t += rng.exponential(1.0 / args.rate)
        turns = 1 + min(int(rng.poisson(4)), 9)
        user, replies, think, ctx = [], [], [], 0
        for k in range(turns):
            u = int(np.clip(rng.lognormal(np.log(args.user_median), 0.8), 4, 4 * args.user_median))
            r = int(np.clip(rng.lognormal(np.log(args.reply_median), 0.6), 4,
                            3 * args.reply_median))
            if ctx + u + r > args.max_model_len - 1:
                break
            ctx += u + r
            user.append(rng.integers(0, vocab - 3, u).tolist())
            replies.append(r)
            think.append(float(rng.exponential(args.think)))
        convs.append(Conversation(f"c{i}", f"client{i % args.clients}", t, user, replies, think))
    return convs


class FCFSResumePolicy(PriorityPolicy):
    """The common design's order: swapped-out requests resume first, in arrival
    order (a FIFO swapped queue); everything else by priority."""

    name = "priority-fcfs-resume"

    def next_waiting(self, waiting: list[Request]) -> Request:
        # a waiting request keeps computed tokens only if its KV is swapped out
        swapped = [r for r in waiting if r.num_computed_tokens > 0]
        if swapped:
            return min(swapped, key=lambda r: r.arrival_time)
        return super().next_waiting(waiting)

    def displacer(self, waiting: list[Request]) -> Request:
        # The same head displaces: while a swapped request waits, nothing newer does.
        return self.next_waiting(waiting)


# engine options; "swap_copy" names the swap executor (`EXECUTORS`)
BASELINE = dict(swap_copy="per_block", async_swap=False, kv_reuse=False, preemption_mode="swap")
SLUICE = dict(swap_copy="grouped", async_swap=True, kv_reuse=True, preemption_mode="auto")
# name -> (engine options, policy factory given the args)
CONFIGS = {
    "baseline": (BASELINE, lambda a: FCFSResumePolicy()),
    # priority with aging; a turn paused mid-stream resumes first; displacement only
    # of turns that have not streamed a token yet
    "sluice": (SLUICE, lambda a: PriorityPolicy(aging_s=a.aging, resume_deadline_s=0.0,
                                                displace_streaming=False)),
    # as sluice, but streaming turns may be displaced too: isolates that choice
    "sluice-displace-streaming": (SLUICE, lambda a: PriorityPolicy(aging_s=a.aging,
                                                                   resume_deadline_s=0.0)),
    # strict priority plus a resume deadline (the previous session's `sluice`)
    "sluice-deadline": (SLUICE, lambda a: PriorityPolicy(resume_deadline_s=a.resume_deadline)),
    "sluice-strict": (SLUICE, lambda a: PriorityPolicy()),
    # Sluice's mechanisms with the baseline's resumption order: isolates the copy path,
    # swap-vs-recompute and KV reuse from the scheduling order.
    "sluice-fcfs-resume": (SLUICE, lambda a: FCFSResumePolicy()),
    "sluice-fair": (SLUICE, lambda a: FairPolicy()),
    # as sluice, with synchronous swaps (outs finish and ins complete before the step):
    # isolates asynchronous swapping
    "sluice-sync-swap": (dict(SLUICE, async_swap=False),
                         lambda a: PriorityPolicy(aging_s=a.aging, resume_deadline_s=0.0,
                                                  displace_streaming=False)),
}


def make_engine(model, name: str, args) -> LLMEngine:
    kw, make_policy = CONFIGS[name]
    kw = dict(kw, scheduling_policy="priority")
    executor = EXECUTORS[kw.pop("swap_copy")]
    policy = make_policy(args)
    spec = KVCacheSpec.for_model(model.config, 1, 16, model.dtype)
    cfg = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.batch_tokens,
                       max_model_len=args.max_model_len,
                       kv_cache_memory=args.kv_blocks * spec.bytes_per_block,
                       swap_space=args.swap_blocks * spec.bytes_per_block,
                       max_preemptions=args.max_preemptions, seed=0, **kw)
    engine = LLMEngine(model, cfg, policy, swap_executor=executor)
    runner = engine.runner  # compile the copy shapes outside the measured run
    size = 1
    while size <= engine.block_manager.num_blocks:
        runner.copy_in([(0, size)], runner.gather([(0, size)]))
        size *= 2
    jax.block_until_ready(runner.kv_cache)
    return engine


def percentiles(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {k: None for k in ("p50", "p95", "p99", "p99.9", "mean")}
    a = np.asarray(xs) * 1e3
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "p99.9": float(np.percentile(a, 99.9)),
            "mean": float(a.mean())}


def fairness_gap(times: np.ndarray, service: np.ndarray, backlogged: np.ndarray) -> float:
    """Max over client pairs and over each interval where both stay backlogged of
    the difference in service received since the interval began."""
    gap = 0.0
    n = service.shape[1]
    for a in range(n):
        for b in range(a + 1, n):
            both = backlogged[:, a] & backlogged[:, b]
            start = None
            for t in range(len(times)):
                if both[t]:
                    if start is None:
                        start = t
                    d = (service[t, a] - service[start, a]) - (service[t, b] - service[start, b])
                    gap = max(gap, abs(float(d)))
                else:
                    start = None
    return gap


def run_workload(engine: LLMEngine, convs: list[Conversation], args) -> dict:
    clients = sorted({c.client for c in convs})
    col = {c: i for i, c in enumerate(clients)}
    prio_rng = np.random.default_rng(args.seed + 1)
    prio = {c: i for i, c in enumerate(clients)}
    history = {c.cid: [] for c in convs}
    turn = {c.cid: 0 for c in convs}
    due = sorted(((c.start, c.cid) for c in convs))
    by_id = {c.cid: c for c in convs}
    live: dict[str, str] = {}  # request id -> conversation id
    ttft, tbt, latency, tokens_out = [], [], [], 0
    service = np.zeros(len(clients))
    svc_rows, backlog_rows, time_rows = [], [], []
    charged: set[str] = set()
    seen: dict[str, int] = {}  # request id -> output tokens already counted
    steps, skipped = 0, 0.0
    t0 = time.perf_counter()
    while due or live:
        now = time.perf_counter() - t0 + skipped
        if not live and due and due[0][0] > now:  # idle: jump to the next arrival
            skipped += due[0][0] - now
            now = due[0][0]
        while due and due[0][0] <= now:
            _, cid = due.pop(0)
            c, k = by_id[cid], turn[cid]
            history[cid] += c.user[k]
            rid = f"{cid}-t{k}"
            engine.add_request(rid, {"prompt_token_ids": list(history[cid])},
                               SamplingParams(max_tokens=c.replies[k], temperature=0.0,
                                              ignore_eos=True),
                               priority=prio[c.client], client=c.client, conversation=cid)
            live[rid] = cid
        if steps and steps % args.priority_every == 0:  # reshuffle client priorities
            order = prio_rng.permutation(len(clients))
            prio = {c: int(order[i]) for i, c in enumerate(clients)}
            for rid, cid in live.items():
                engine.set_priority(rid, prio[by_id[cid].client])
        outs = engine.step()
        steps += 1
        for o in outs:
            cid = live.get(o.request_id)
            c = by_id[cid]
            m = o.metrics[0]
            if o.request_id not in charged and m.first_token_time is not None:
                charged.add(o.request_id)
                service[col[c.client]] += W_IN * len(o.prompt_token_ids)
            n_out = len(o.outputs[0].token_ids)
            service[col[c.client]] += W_OUT * (n_out - seen.get(o.request_id, 0))
            seen[o.request_id] = n_out
            if not o.finished:
                continue
            del live[o.request_id]
            ids = o.outputs[0].token_ids
            tokens_out += len(ids)
            ttft.append(m.first_token_time - m.arrival_time)
            tbt.extend(np.diff(m.token_times).tolist())
            latency.append(m.finished_time - m.arrival_time)
            history[cid] += ids
            turn[cid] += 1
            if turn[cid] < len(c.user):
                at = time.perf_counter() - t0 + skipped + c.think[turn[cid] - 1]
                due.append((at, cid))
                due.sort()
        busy = np.zeros(len(clients), bool)
        for cid in live.values():
            busy[col[by_id[cid].client]] = True
        svc_rows.append(service.copy())
        backlog_rows.append(busy)
        time_rows.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    if engine.swapper is not None:
        engine.swapper.wait()
    sched, sw = engine.scheduler, engine.swapper
    bpb = engine.runner.spec.bytes_per_block
    gap = fairness_gap(np.asarray(time_rows), np.asarray(svc_rows), np.asarray(backlog_rows))
    max_prompt = max(len(history[c.cid]) for c in convs)
    pool_tokens = engine.block_manager.num_blocks * engine.block_manager.block_size
    bound = 2 * max(W_IN * max_prompt, W_OUT * pool_tokens)
    stats = sw.stats if sw is not None else None
    return {
        "config": dataclasses.asdict(engine.config) | {"device": None},
        "swap_executor": type(engine.swapper).__name__ if engine.swapper else None,
        "policy": type(sched.policy).__name__,
        "turns": len(ttft), "steps": steps, "wall_s": wall, "idle_skipped_s": skipped,
        "output_tokens": tokens_out, "throughput_tok_s": tokens_out / wall,
        "ttft_ms": percentiles(ttft), "tbt_ms": percentiles(tbt),
        "latency_ms": percentiles(latency),
        "preemptions": sched.num_preemptions, "swap_outs_preempt": sched.num_swap_outs,
        "recomputes": sched.num_recomputes,
        "copies_out": stats.num_swap_outs if stats else 0,
        "copies_in": stats.num_swap_ins if stats else 0,
        "copy_calls": stats.copy_calls if stats else 0,
        "bytes_out": stats.blocks_out * bpb if stats else 0,
        "bytes_in": stats.blocks_in * bpb if stats else 0,
        "reused_blocks": sched.num_reused_blocks,
        "stall_s": stats.stall_s if stats else 0.0,
        "cost_model": ({"copy_GBps": sw.cost.copy_bytes_per_s / 1e9,
                        "prefill_us_per_token": sw.cost.prefill_s_per_token * 1e6}
                       if sw else None),
        "fairness": {"max_gap": gap, "vtc_bound": bound, "within_bound": gap <= bound,
                     "final_service": dict(zip(clients, service.tolist()))},
        "free_blocks_restored": engine.block_manager.num_free_blocks
        == engine.block_manager.num_blocks,
        "ttft_s_all": ttft, "tbt_s_sample": tbt[::max(1, len(tbt) // 2000)],
    }


def workload(args) -> dict:
    model = load_model(args.model, progress=False)
    convs = make_workload(args, model.config.vocab_size)
    names = args.configs.split(",")
    if "baseline" not in names or "sluice" not in names:
        raise SystemExit("--configs: must include baseline and sluice")
    out = {"command": "bench/preemption.py " + " ".join(args.argv), "machine": machine(),
           "model": args.model, "conversations": len(convs),
           "turns_total": sum(len(c.user) for c in convs),
           "mean_turns": float(np.mean([len(c.user) for c in convs])), "runs": {}}
    for name in names:
        engine = make_engine(model, name, args)
        print(f"running {name} ...", flush=True)
        res = run_workload(engine, convs, args)
        if engine.swapper is not None:
            engine.swapper.close()
        out["runs"][name] = res
        print(json.dumps({k: res[k] for k in ("wall_s", "throughput_tok_s", "ttft_ms", "tbt_ms",
                                              "preemptions", "recomputes", "bytes_out",
                                              "bytes_in", "stall_s", "reused_blocks")}),
              flush=True)
    b = out["runs"]["baseline"]
    out["ratios_baseline_over"] = {
        name: {"p99_ttft": b["ttft_ms"]["p99"] / s["ttft_ms"]["p99"],
               "p99.9_tbt": b["tbt_ms"]["p99.9"] / s["tbt_ms"]["p99.9"],
               "stall": b["stall_s"] / max(s["stall_s"], 1e-9),
               "bytes_copied": (b["bytes_out"] + b["bytes_in"])
               / max(1, s["bytes_out"] + s["bytes_in"]),
               "throughput_other_over_baseline": s["throughput_tok_s"] / b["throughput_tok_s"]}
        for name, s in out["runs"].items() if name != "baseline"}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, r in runs.items():
        xs = np.sort(np.asarray(r["ttft_s_all"]) * 1e3)
        axes[0].plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=name)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("TTFT (ms)")
    axes[0].set_ylabel("CDF")
    axes[0].legend()
    keys = ["p50", "p95", "p99", "p99.9"]
    width = 0.8 / len(runs)
    for i, (name, r) in enumerate(runs.items()):
        axes[1].bar(np.arange(4) + i * width, [r["tbt_ms"][k] for k in keys], width, label=name)
    axes[1].set_xticks(np.arange(4) + 0.4 - width / 2, keys)
    axes[1].set_ylabel("time between tokens (ms)")
    axes[1].set_yscale("log")
    axes[1].legend()
    labels = ["stall s", "GB copied", "preemptions/100"]
    for i, (name, r) in enumerate(runs.items()):
        vals = [r["stall_s"], (r["bytes_out"] + r["bytes_in"]) / 1e9, r["preemptions"] / 100]
        axes[2].bar(np.arange(3) + i * width, vals, width, label=name)
    axes[2].set_xticks(np.arange(3) + 0.4 - width / 2, labels)
    axes[2].legend()
    fig.suptitle(f"multi-turn workload, {result['model']}, {result['machine']['backend']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    import sys
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["micro", "workload", "all"], default="all")
    ap.add_argument("--micro-models", default="smollm2-135m-random,tiny")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--conversations", type=int, default=48)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rate", type=float, default=4.0, help="conversations per second")
    ap.add_argument("--think", type=float, default=0.5, help="mean pause between turns, s")
    ap.add_argument("--user-median", type=int, default=48)
    ap.add_argument("--reply-median", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--batch-tokens", type=int, default=256)
    ap.add_argument("--kv-blocks", type=int, default=160)
    ap.add_argument("--swap-blocks", type=int, default=2048)
    ap.add_argument("--max-preemptions", type=int, default=8)
    ap.add_argument("--priority-every", type=int, default=40)
    ap.add_argument("--resume-deadline", type=float, default=0.1,
                    help="sluice-deadline: seconds before a preempted turn resumes first")
    ap.add_argument("--configs", default="baseline,sluice,sluice-displace-streaming,"
                                         "sluice-deadline,sluice-strict,sluice-fcfs-resume,"
                                         "sluice-fair",
                    help=f"comma-separated, from {sorted(CONFIGS)}")
    ap.add_argument("--aging", type=float, default=0.1,
                    help="sluice configs with aging: seconds of waiting per priority level gained")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--suffix", default="", help="appended to the workload result file names")
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    RESULTS.mkdir(exist_ok=True)
    if args.part in ("micro", "all"):
        res = micro(args)
        (RESULTS / "preemption_swap.json").write_text(json.dumps(res, indent=2))
        for r in res["results"]:
            print(json.dumps({k: r[k] for k in ("model", "blocks", "bytes", "best_s",
                                                "copy_calls_each_way",
                                                "speedup_grouped_vs_per_block",
                                                "speedup_grouped_vs_per_layer_block")}, indent=2))
    if args.part in ("workload", "all"):
        res = workload(args)
        name = f"preemption_workload{args.suffix}"
        (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=2))
        plot(res, RESULTS / f"{name}.png")
        print(json.dumps(res["ratios_baseline_over"], indent=2))


if __name__ == "__main__":
    main()
