"""Preemption by swap and recompute (issue 6): block-group copies, asynchronous
swap-out, swap-vs-recompute by estimated cost, multi-turn KV reuse, and the
invariant that greedy outputs do not change under preemption storms."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from sluice.runtime import SamplingParams, greedy_generate
from sluice.runtime.engine import EngineConfig, LLMEngine
from sluice.runtime.kv_cache import KVCacheSpec, blocks_for
from sluice.runtime.model_runner import ModelRunner
from sluice.runtime.swap import HostSwapSpace, SwapCostModel, SwapExecutor, _pieces

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _bench_preemption():
    """``bench/preemption.py`` as a module: its copy-granularity baselines."""
    spec = importlib.util.spec_from_file_location(
        "bench_preemption", Path(__file__).parents[1] / "bench" / "preemption.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


EXECUTORS = _bench_preemption().EXECUTORS  # the runtime's SwapExecutor and the baselines
BLOCK = 32 * 1024  # bytes of one tiny-model KV block (16 tokens)


def engine_for(model, **kw) -> LLMEngine:
    kw.setdefault("scheduling_policy", "priority")
    return LLMEngine(model, EngineConfig(warmup=False, max_model_len=128, seed=0, **kw))


# -- copies ------------------------------------------------------------------------


@pytest.mark.parametrize("max_piece", [1 << 30, 4])
def test_pieces_cover_runs_in_order(max_piece):
    runs = [(3, 13), (40, 1), (50, 8), (70, 0)]
    pieces = _pieces(runs, max_piece)
    covered = [b for s, n in pieces for b in range(s, s + n)]
    assert covered == [b for s, n in runs for b in range(s, s + n)]
    assert all(n & (n - 1) == 0 and n <= max_piece for _, n in pieces)
    assert len(_pieces([(0, 13)])) == 3  # 8 + 4 + 1


@pytest.mark.parametrize("mode,asynchronous", [("grouped", True), ("grouped", False),
                                                ("per_block", False),
                                                ("per_layer_block", False)])
def test_copies_round_trip_while_device_blocks_are_reused(tiny, mode, asynchronous):
    """Swap out, overwrite the vacated device blocks at once (as a new request
    would), then swap back into other blocks (asynchronously: issued behind a
    step still in flight, not waited for): the bytes come back unchanged. Also
    for bench/preemption.py's baselines, whose comparison relies on it."""
    runner = ModelRunner(tiny, 32, 16, max_num_seqs=1, max_num_batched_tokens=16,
                         max_prefill_seqs=1, max_model_len=128)
    rng = np.random.default_rng(0)
    runner.kv_cache = jnp.asarray(rng.standard_normal(runner.spec.shape, np.float32))
    original = np.asarray(runner.kv_cache)
    space = HostSwapSpace(runner.spec, 16)
    ex = EXECUTORS[mode](runner, space, asynchronous)
    runs = [(2, 5), (9, 3)]
    host = space.reserve(8)
    ex.run([(None, runs, host)], [])
    junk = jnp.full((8,) + runner.spec.shape[1:], 7.0, runner.spec.dtype)
    runner.copy_in([(2, 8)], junk)  # reuse before the store lands
    behind = (runner.kv_cache * 2.0).sum() if asynchronous else None  # a step in flight
    ex.run([], [(None, [(20, 8)], host)], release=host, behind=behind)
    restored = np.asarray(runner.kv_cache)
    ids = [2, 3, 4, 5, 6, 9, 10, 11]
    np.testing.assert_array_equal(restored[20:28], original[ids])
    assert space.num_free_blocks == 16
    assert ex.stats.blocks_out == ex.stats.blocks_in == 8
    per_block_copies = runner.spec.shape[1] * 2 if mode == "per_layer_block" else 1  # layers, K/V
    calls = 5 if mode == "grouped" else 16 * per_block_copies  # grouped: 4+1, 2+1 out; 8 in
    assert ex.stats.copy_calls == calls
    ex.close()


# -- host swap space -----------------------------------------------------------------


def test_host_space_refcounts_and_conversation_lru(tiny):
    spec = KVCacheSpec.for_model(tiny.config, 8, 16, tiny.dtype)
    space = HostSwapSpace(spec, 6)
    a = space.reserve(3)
    space.retain(a[:2])
    space.release(a)
    assert space.num_free_blocks == 4  # two still referenced
    space.release(a[:2])
    assert space.num_free_blocks == 6
    with pytest.raises(ValueError, match="released"):
        space.release(a[:1])
    tokens = list(range(100))
    space.remember("x", tokens, space.reserve(3))  # holds tokens 0..47
    space.remember("y", tokens[::-1], space.reserve(2))
    assert space.match("x", tokens[:40] + [999] * 20, 10) == space.conversations["x"].blocks[:2]
    assert len(space.match("x", tokens, 2)) == 2  # capped
    assert space.match("x", [5] + tokens[1:], 10) == []
    assert space.match("nobody", tokens, 10) == []
    # "x" was used last, so the next shortage evicts "y" first.
    got = space.reserve(3)
    assert got is not None and "y" not in space.conversations and "x" in space.conversations
    # Evicting "x" too frees 3 blocks, still short of 4: nothing reserved, x gone.
    assert space.reserve(4) is None and "x" not in space.conversations
    assert space.num_conversation_evictions == 2 and space.num_free_blocks == 3


def test_cost_model_estimates_follow_measurements():
    cost = SwapCostModel(bytes_per_block=1 << 20, copy_bytes_per_s=1e9, prefill_s_per_token=1e-4,
                         overhead_s=0.0, alpha=0.5, min_step_tokens=32)
    assert cost.prefer_swap(10, 10, 1000)  # 20 MB at 1 GB/s = 21 ms < 100 ms of prefill
    cost.observe_step(8, 0, 1.0)  # too few tokens: a decode step, ignored
    cost.observe_step(64, 40, 1.0)  # 24 decode rows of 64 tokens: too mixed, ignored
    assert cost.prefill_s_per_token == 1e-4
    for _ in range(20):
        cost.observe_copy(1 << 20, 0.1)  # 10 MB/s measured
    assert cost.copy_bytes_per_s < 2e7
    assert not cost.prefer_swap(10, 10, 1000)
    for _ in range(20):
        cost.observe_step(100, 90, 100.0)  # 1 s per token, mostly prefill
    assert cost.prefer_swap(10, 10, 1000)


# -- engine invariants -----------------------------------------------------------------


def _storm(engine: LLMEngine, prompts: dict[str, list[int]], max_tokens: int, seed: int,
           aborts: int = 0) -> dict[str, list[int]]:
    """Run requests while re-prioritising random live ones every step."""
    rng = np.random.default_rng(seed)
    ids = list(prompts)
    for i, rid in enumerate(ids[:len(ids) // 2]):
        engine.add_request(rid, {"prompt_token_ids": prompts[rid]},
                           SamplingParams(max_tokens=max_tokens, **GREEDY), priority=i % 3,
                           client=f"c{i % 2}")
    pending = ids[len(ids) // 2:]
    aborted: set[str] = set()
    outs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests() or pending:
        if pending and rng.random() < 0.3:
            rid = pending.pop(0)
            engine.add_request(rid, {"prompt_token_ids": prompts[rid]},
                               SamplingParams(max_tokens=max_tokens, **GREEDY),
                               priority=int(rng.integers(3)))
        live = [r for r in ids if r not in outs and r not in pending and r not in aborted]
        for rid in rng.choice(live, size=min(3, len(live)), replace=False) if live else []:
            engine.set_priority(str(rid), int(rng.integers(5)))
        if aborts and live and rng.random() < 0.05:
            rid = str(rng.choice(live))
            engine.abort_request(rid)
            aborted.add(rid)
            aborts -= 1
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
    assert set(outs) | aborted == set(ids)  # nothing lost
    return outs


STORMS = {
    "recompute": dict(),
    "swap-grouped-sync": dict(swap_space=64 * BLOCK, preemption_mode="swap", async_swap=False),
    "swap-grouped-async": dict(swap_space=64 * BLOCK, preemption_mode="swap"),
    "swap-exhausted": dict(swap_space=3 * BLOCK, preemption_mode="swap"),
    "auto": dict(swap_space=64 * BLOCK),
}


@pytest.mark.parametrize("name", list(STORMS))
def test_greedy_outputs_survive_preemption_storms(tiny, name):
    engine = engine_for(tiny, max_num_seqs=4, max_num_batched_tokens=64,
                        kv_cache_memory=12 * BLOCK, max_preemptions=100, **STORMS[name])
    rng = np.random.default_rng(1)
    prompts = {f"r{i}": rng.integers(0, 250, int(rng.integers(10, 40))).tolist()
               for i in range(10)}
    outs = _storm(engine, prompts, 24, seed=2, aborts=2)
    for rid, tokens in outs.items():
        assert tokens == greedy_generate(tiny, prompts[rid], 24, stop_at_eos=False), rid
    sched = engine.scheduler
    assert sched.num_preemptions > 5
    if name == "recompute":
        assert engine.swapper is None and sched.num_recomputes == sched.num_preemptions
    elif name.startswith("swap"):
        assert sched.num_swap_outs > 0
        assert (sched.num_recomputes > 0) == (name == "swap-exhausted")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    if engine.swapper is not None:
        engine.swapper.close()
        space = sched.kv.host
        assert space.num_free_blocks == space.num_blocks  # no conversations: nothing kept


def test_auto_mode_chooses_by_estimated_cost(tiny):
    def run(**cost):
        engine = engine_for(tiny, max_num_seqs=4, max_num_batched_tokens=64,
                            kv_cache_memory=12 * BLOCK, max_preemptions=100,
                            swap_space=64 * BLOCK, preemption_mode="auto")
        c = engine.swapper.cost
        c.alpha = 0.0  # freeze the estimates at the given values
        for k, v in cost.items():
            setattr(c, k, v)
        prompts = {f"r{i}": [i + 1] * 30 for i in range(6)}
        outs = _storm(engine, prompts, 16, seed=3)
        for rid, tokens in outs.items():
            assert tokens == greedy_generate(tiny, prompts[rid], 16, stop_at_eos=False)
        return engine.scheduler

    slow_copies = run(copy_bytes_per_s=1.0)
    assert slow_copies.num_preemptions > 0 and slow_copies.num_swap_outs == 0
    slow_prefill = run(prefill_s_per_token=10.0)
    assert slow_prefill.num_swap_outs > 0 and slow_prefill.num_recomputes == 0


# -- multi-turn reuse --------------------------------------------------------------------


@pytest.mark.parametrize("reuse", [True, False])
def test_next_turn_copies_in_the_conversation_kv(tiny, reuse):
    engine = engine_for(tiny, max_num_seqs=1, swap_space=32 * BLOCK, preemption_mode="swap",
                        kv_reuse=reuse)
    sched, stats = engine.scheduler, engine.swapper.stats
    turn1 = list(range(1, 41))
    engine.add_request("t1", {"prompt_token_ids": turn1}, SamplingParams(max_tokens=20, **GREEDY),
                       conversation="conv")
    out1 = _drain(engine)["t1"]
    engine.swapper.wait()
    engine.block_manager.reset_prefix_cache()  # the device copy is gone: only host memory has it
    turn2 = turn1 + out1 + [7, 8, 9, 10, 11, 12]
    engine.add_request("t2", {"prompt_token_ids": turn2}, SamplingParams(max_tokens=30, **GREEDY),
                       priority=5, conversation="conv")
    for _ in range(4):
        engine.step()
    saved = 59 // 16  # turn 1 finished with 59 tokens' KV written: 3 full blocks
    assert sched.num_reused_blocks == (saved if reuse else 0)
    # A higher-priority request displaces turn 2: its swap-out copies only the
    # blocks not already in host memory.
    req = sched.running[0]
    before = stats.blocks_out
    engine.add_request("urgent", {"prompt_token_ids": [3] * 20},
                       SamplingParams(max_tokens=4, **GREEDY), priority=0)
    engine.step()
    assert sched.kv.is_swapped(req.request_id)
    total = blocks_for(req.num_computed_tokens, 16)
    assert stats.blocks_out - before == total - (saved if reuse else 0)
    outs = _drain(engine)
    assert outs["t2"] == greedy_generate(tiny, turn2, 30, stop_at_eos=False)
    assert outs["urgent"] == greedy_generate(tiny, [3] * 20, 4, stop_at_eos=False)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.swapper.wait()
    space = sched.kv.host
    assert ("conv" in space.conversations) == reuse
    space.forget("conv")
    assert space.num_free_blocks == space.num_blocks
    engine.swapper.close()


def test_conversation_lru_is_bounded_and_reuse_survives_eviction_of_others(tiny):
    engine = engine_for(tiny, max_num_seqs=2, swap_space=6 * BLOCK, preemption_mode="swap")
    space = engine.scheduler.kv.host
    prompts = {f"conv{i}": [i + 1] * 50 for i in range(4)}  # 3 full blocks each once done
    for cid, p in prompts.items():
        engine.add_request(cid, {"prompt_token_ids": p}, SamplingParams(max_tokens=4, **GREEDY),
                           conversation=cid)
        _drain(engine)
    engine.swapper.wait()
    assert len(space.conversations) == 2  # 6 host blocks hold two conversations
    assert list(space.conversations) == ["conv2", "conv3"]  # the least recently used went
    assert space.num_conversation_evictions == 2
    for cid in list(space.conversations):
        space.forget(cid)
    assert space.num_free_blocks == space.num_blocks
    engine.swapper.close()


def _drain(engine: LLMEngine) -> dict[str, list[int]]:
    outs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        _step(engine, outs)
    return outs


# -- asynchronous swap-in ----------------------------------------------------------------

RESUME = {"long": ([5] * 20, 40, 0), "low": ([9] * 30, 30, 5), "urgent": ([3] * 20, 4, 0)}


class _Fetched:
    """A step output that logs when the host fetches it (``np.asarray``)."""

    def __init__(self, array, log: list[str]):
        self.array, self.log = array, log

    def __array__(self, dtype=None, copy=None):
        self.log.append("fetch")
        return np.asarray(self.array, dtype)

    def __getattr__(self, name):
        return getattr(self.array, name)


def _log_step_events(engine: LLMEngine, monkeypatch) -> list[tuple[str, object]]:
    """Per engine step, in order: ("step", ids run), "sample" (dispatched),
    "copy_in", "fetch", "observe" (the step offered to the cost model)."""
    events: list = []
    runner, swapper = engine.runner, engine.swapper
    execute, sample, copy_in = runner.execute, runner._sample, swapper._copy_in
    observe = swapper.cost.observe_step

    def spy_execute(rows, during=None, *rest):
        events.append(("step", [r.request.request_id for r in rows]))
        return execute(rows, during, *rest)

    def spy_sample(logits, rows, *rest):
        out = sample(logits, rows, *rest)
        events.append("sample")
        return tuple(_Fetched(a, events) for a in out)

    def spy_copy_in(runs, host):
        events.append("copy_in")
        return copy_in(runs, host)

    def spy_observe(*args):
        events.append("observe")
        return observe(*args)

    monkeypatch.setattr(runner, "execute", spy_execute)
    monkeypatch.setattr(runner, "_sample", spy_sample)
    monkeypatch.setattr(swapper, "_copy_in", spy_copy_in)
    monkeypatch.setattr(swapper.cost, "observe_step", spy_observe)
    return events


def _step(engine: LLMEngine, outs: dict[str, list[int]]) -> None:
    outs.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})


def _start_resume_scenario(engine: LLMEngine, outs: dict[str, list[int]]) -> None:
    """Add RESUME's requests three steps apart: ``urgent`` displaces ``low`` (two
    sequence slots, ``long`` keeps the other); ``low`` is swapped back in later,
    while ``long`` still runs."""
    for rid in ("long", "low", "urgent"):
        prompt, n, priority = RESUME[rid]
        engine.add_request(rid, {"prompt_token_ids": prompt},
                           SamplingParams(max_tokens=n, **GREEDY), priority=priority)
        for _ in range(3):
            _step(engine, outs)


def _resume_while_another_runs(engine: LLMEngine) -> dict[str, list[int]]:
    """The RESUME scenario run to the end; returns the outputs."""
    outs: dict[str, list[int]] = {}
    _start_resume_scenario(engine, outs)
    outs.update(_drain(engine))
    return outs


def _check_outputs(tiny, engine: LLMEngine, outs: dict, requests: dict) -> None:
    for rid, (prompt, n, _) in requests.items():
        assert outs[rid] == greedy_generate(tiny, prompt, n, stop_at_eos=False), rid
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.swapper.close()
    space = engine.scheduler.kv.host
    assert space.num_free_blocks == space.num_blocks


@pytest.mark.parametrize("asynchronous", [True, False])
def test_swap_in_overlaps_the_step_it_is_issued_in(tiny, asynchronous, monkeypatch):
    engine = engine_for(tiny, max_num_seqs=2, swap_space=32 * BLOCK, preemption_mode="swap",
                        async_swap=asynchronous, kv_reuse=False)
    events = _log_step_events(engine, monkeypatch)
    outs = _resume_while_another_runs(engine)
    assert engine.swapper.stats.num_swap_ins == 1
    at = events.index("copy_in")
    steps = [i for i, e in enumerate(events) if isinstance(e, tuple)]
    issued_in = max(i for i in steps if i < at)  # the step whose call issued it (if any)
    after = [events[i][1] for i in steps if i > at]
    if asynchronous:  # after the step's dispatch and before its results are fetched...
        assert events[issued_in:at] == [events[issued_in], "sample"]
        assert events[at + 1] == "fetch"
        assert events[issued_in][1] == ["long"]  # ...of a step that does not run `low`...
        assert "low" in after[0]  # ...which runs from the next step
    else:  # issued and complete before the step that runs `low`
        assert "fetch" in events[issued_in:at]  # the previous step had finished
        assert "low" in after[0]
    # Every step's time goes to the prefill-rate estimate except one with a copy inside.
    for s, end in zip(steps, steps[1:] + [len(events)]):
        assert ("observe" in events[s:end]) == (not asynchronous or s != issued_in), s
    _check_outputs(tiny, engine, outs, RESUME)


class _Step:
    """Stands in for a forward step's output, still running or finished."""

    def __init__(self, finished: bool):
        self.finished = finished

    def is_ready(self) -> bool:
        return self.finished


@pytest.mark.parametrize("behind", [None, "running", "finished"])
def test_swap_in_stall_and_copy_samples_depend_on_overlap(tiny, behind):
    """A synchronous swap-in is stall and a copy-bandwidth sample; one issued
    behind a running step is neither; behind a step that had already finished,
    the device waited for it: stall, but still no sample (it was not waited for)."""
    runner = ModelRunner(tiny, 8, 16, max_num_seqs=1, max_num_batched_tokens=16,
                         max_prefill_seqs=1, max_model_len=128)
    space = HostSwapSpace(runner.spec, 4)
    ex = SwapExecutor(runner, space, asynchronous=True)
    host = space.reserve(4)
    ex.run([], [(None, [(2, 4)], host)], release=host,
           behind=None if behind is None else _Step(behind == "finished"))
    runner.kv_cache.block_until_ready()
    assert (ex.stats.stall_s > 0) == (behind != "running")
    assert ex.cost.num_copy_samples == (behind is None)
    assert ex.stats.num_swap_ins == 1 and space.num_free_blocks == 4
    ex.close()


SWITCH = {"A": ([5] * 20, 40, 0), "B": ([9] * 30, 30, 5), "C": ([3] * 20, 30, 0)}


def _fail_once(monkeypatch, obj, name: str) -> list[int]:
    calls, real = [], getattr(obj, name)

    def flaky(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(f"{name} failed")
        return real(*args)

    monkeypatch.setattr(obj, name, flaky)
    return calls


@pytest.mark.parametrize("asynchronous", [True, False])
@pytest.mark.parametrize("where", ["swap-in", "swap-out", "forward"])
def test_a_failed_step_with_swaps_recomputes_and_leaks_nothing(tiny, asynchronous, where,
                                                               monkeypatch):
    """A step that swaps ``A`` out and ``B`` in fails in the copy-in, in the
    copy-out or in the forward: the engine goes on, every output is unchanged
    and no device or host block leaks (asynchronously, the swap-in is issued
    only inside the forward call, so the two earlier failures precede it). A
    failure inside the forward call (all three, asynchronously) fails no one:
    the engine re-runs the step's rows; a synchronous copy's failure raises."""
    engine = engine_for(tiny, max_num_seqs=2, swap_space=32 * BLOCK, preemption_mode="swap",
                        async_swap=asynchronous, kv_reuse=False)
    outs: dict[str, list[int]] = {}
    for rid in SWITCH:  # C displaces B (swapped out); A keeps running
        prompt, n, priority = SWITCH[rid]
        engine.add_request(rid, {"prompt_token_ids": prompt},
                           SamplingParams(max_tokens=n, **GREEDY), priority=priority)
        _step(engine, outs)
        _step(engine, outs)
    assert [r.request_id for r in engine.scheduler.waiting
            if engine.scheduler.kv.is_swapped(r.request_id)] == ["B"]
    engine.set_priority("A", 9)  # now B displaces A: one step swaps A out and B in
    target = {"swap-in": (engine.scheduler.kv.host, "load"),
              "swap-out": (engine.swapper, "copy_out"),
              "forward": (engine.runner, "_sample")}[where]
    calls = _fail_once(monkeypatch, *target)
    schedule, seen = engine.scheduler.schedule, []
    monkeypatch.setattr(engine.scheduler, "schedule", lambda: seen.append(schedule()) or seen[-1])
    if where == "forward" or asynchronous:
        _step(engine, outs)
        assert engine.stats().num_failed_requests == 0
    else:
        with pytest.raises(RuntimeError, match="failed"):
            _step(engine, outs)
    moved = [[c[0] for c in copies] for copies in (seen[0].swap_out, seen[0].swap_in)]
    assert moved == [["A"], ["B"]] and calls  # (the forward's re-runs call it again)
    monkeypatch.undo()
    outs.update(_drain(engine))
    _check_outputs(tiny, engine, outs, SWITCH)


def test_deferred_copy_ins_count_against_the_step_limits(tiny, monkeypatch):
    """Admissions whose copy-in overlaps the step take their share of its
    prompt-chunk limit, so one step does not start more copy-ins than it could run."""
    engine = engine_for(tiny, max_num_seqs=4, max_prefill_seqs=1, swap_space=32 * BLOCK)
    first = {f"c{i}": [i + 1] * 40 for i in range(3)}
    for cid, prompt in first.items():
        engine.add_request(f"{cid}-1", {"prompt_token_ids": prompt},
                           SamplingParams(max_tokens=8, **GREEDY), conversation=cid)
    done = _drain(engine)
    engine.swapper.wait()
    engine.block_manager.reset_prefix_cache()  # only host memory has the first turns now
    schedule, seen = engine.scheduler.schedule, []
    monkeypatch.setattr(engine.scheduler, "schedule", lambda: seen.append(schedule()) or seen[-1])
    second = {cid: prompt + done[f"{cid}-1"] + [7] * 9 for cid, prompt in first.items()}
    for cid, prompt in second.items():
        engine.add_request(f"{cid}-2", {"prompt_token_ids": prompt},
                           SamplingParams(max_tokens=8, **GREEDY), conversation=cid)
    outs = _drain(engine)
    assert engine.scheduler.num_reused_blocks == 3 * (47 // 16)  # full blocks of 47 KV tokens
    assert max(len(s.swap_in) for s in seen) == 1
    # the schedule is plain data: ids, block ids, counts (no live request objects)
    assert all(isinstance(c[0], str) for s in seen for c in s.swap_out + s.swap_in)
    assert all(isinstance(r.request_id, str) and all(isinstance(b, int) for b in r.block_table)
               for s in seen for r in s.rows)
    for cid, prompt in second.items():
        assert outs[f"{cid}-2"] == greedy_generate(tiny, prompt, 8, stop_at_eos=False)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.swapper.close()


@pytest.mark.parametrize("asynchronous", [True, False])
def test_abort_right_after_a_swap_in_leaks_nothing(tiny, asynchronous):
    """``low`` is aborted in the step after its copy-in was issued (asynchronously:
    before it ever ran on the copied KV); the others finish unchanged."""
    engine = engine_for(tiny, max_num_seqs=2, swap_space=32 * BLOCK, preemption_mode="swap",
                        async_swap=asynchronous, kv_reuse=False)
    outs: dict[str, list[int]] = {}
    _start_resume_scenario(engine, outs)
    while engine.swapper.stats.num_swap_ins == 0:
        _step(engine, outs)
    low = engine.groups["low"].requests[0]
    assert low in engine.scheduler.running
    assert engine.scheduler.kv.host_blocks(low.request_id) == []
    engine.abort_request("low")
    outs.update(_drain(engine))
    assert "low" not in outs
    _check_outputs(tiny, engine, outs, {k: RESUME[k] for k in ("long", "urgent")})


@pytest.mark.parametrize("asynchronous", [True, False])
def test_live_migration_right_after_a_swap_in_moves_the_copied_kv(tiny, asynchronous):
    """``low`` moves to another engine in the step after its copy-in was issued
    (asynchronously: before it ever ran on the copied KV, so the export must
    read the pool after the copy): its output there is unchanged, and no block
    leaks on either side."""
    src = engine_for(tiny, max_num_seqs=2, swap_space=32 * BLOCK, preemption_mode="swap",
                     async_swap=asynchronous, kv_reuse=False)
    dst = engine_for(tiny, max_num_seqs=2)
    outs: dict[str, list[int]] = {}
    _start_resume_scenario(src, outs)
    while src.swapper.stats.num_swap_ins == 0:
        _step(src, outs)
    low = src.groups["low"].requests[0]
    computed = low.num_computed_tokens
    epoch = src.migration.epoch("low")
    assert epoch is not None
    chunks = src.migration.export_kv("low", {}, epoch)
    assert dst.migration.import_kv("low", chunks)
    handover = src.migration.suspend("low", {"low": chunks[0].num_blocks}, epoch)
    assert handover.num_computed_tokens == {"low": computed} and dst.migration.adopt(handover)
    src.migration.release("low")
    outs.update(_drain(src))
    outs.update(_drain(dst))
    assert dst.block_manager.num_free_blocks == dst.block_manager.num_blocks
    _check_outputs(tiny, src, outs, RESUME)
