"""Scheduling policies: priority displacement (bounded, output-preserving),
runtime re-prioritisation, and fairness by virtual token counters."""

from __future__ import annotations

import pytest

from sluice.runtime import SamplingParams, greedy_generate
from sluice.runtime.engine import EngineConfig, LLMEngine
from sluice.scheduler.policies import FairOptions, FairPolicy, PriorityOptions, make_policy

GREEDY = dict(temperature=0.0, ignore_eos=True)


def engine_for(model, policy: str, **kw) -> LLMEngine:
    kw.setdefault("max_num_seqs", 1)
    return LLMEngine(model, EngineConfig(scheduling_policy=policy, warmup=False,
                                         max_model_len=128, **kw))


class Clock:
    """A clock the test advances (the policy's, and the scheduler's policy stamps)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def drain(engine: LLMEngine) -> list[str]:
    """Run to completion; returns request ids in finishing order."""
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    return order


def test_priority_displaces_lower_and_keeps_output(tiny):
    engine = engine_for(tiny, "priority")
    low = [1, 2, 3, 4]
    engine.add_request("low", {"prompt_token_ids": low}, SamplingParams(max_tokens=20, **GREEDY),
                       priority=5)
    for _ in range(4):
        engine.step()
    engine.add_request("high", {"prompt_token_ids": [9, 8, 7]},
                       SamplingParams(max_tokens=5, **GREEDY), priority=0)
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert list(outs) == ["high", "low"]
    assert outs["low"].metrics[0].num_preemptions == 1
    assert outs["low"].outputs[0].token_ids == greedy_generate(tiny, low, 20, stop_at_eos=False)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_fcfs_never_displaces(tiny):
    engine = engine_for(tiny, "fcfs")
    engine.add_request("first", {"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=8, **GREEDY),
                       priority=5)
    engine.step()
    engine.add_request("urgent", {"prompt_token_ids": [3]}, SamplingParams(max_tokens=2, **GREEDY),
                       priority=0)
    assert drain(engine) == ["first", "urgent"]


def test_displacement_is_bounded(tiny):
    engine = engine_for(tiny, "priority", max_preemptions=1)
    engine.add_request("low", {"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=30, **GREEDY),
                       priority=9)
    engine.step()
    outs = {}
    for i in range(3):  # three waves of urgent work; "low" may be displaced only once
        engine.add_request(f"hi{i}", {"prompt_token_ids": [5 + i]},
                           SamplingParams(max_tokens=3, **GREEDY), priority=0)
        for _ in range(6):
            outs.update({o.request_id: o for o in engine.step() if o.finished})
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert list(outs) == ["hi0", "low", "hi1", "hi2"]
    assert outs["low"].metrics[0].num_preemptions == 1


def test_set_priority_at_runtime(tiny):
    engine = engine_for(tiny, "priority")
    engine.add_request("a", {"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=10, **GREEDY),
                       priority=1)
    engine.step()
    engine.add_request("b", {"prompt_token_ids": [3, 4]}, SamplingParams(max_tokens=3, **GREEDY),
                       priority=1)
    engine.step()
    engine.set_priority("b", 0)  # now b outranks the running a
    assert drain(engine) == ["b", "a"]
    with pytest.raises(ValueError, match="priority"):
        engine.set_priority("a", "high")
    engine.set_priority("unknown", 3)  # no-op
    with pytest.raises(ValueError, match="priority: must be an integer"):
        engine.add_request("c", {"prompt_token_ids": [5]}, priority=1.5)
    assert "c" not in engine.groups


def test_fair_policy_serves_the_least_served_client_first(tiny):
    engine = engine_for(tiny, "fair")
    for i in range(4):
        engine.add_request(f"heavy{i}", {"prompt_token_ids": [1] * 20},
                           SamplingParams(max_tokens=6, **GREEDY), client="heavy")
    engine.step()  # heavy0 admitted; heavy's counter now carries its prompt
    engine.add_request("light0", {"prompt_token_ids": [2, 3]},
                       SamplingParams(max_tokens=6, **GREEDY), client="light")
    order = drain(engine)
    assert order.index("light0") < order.index("heavy1")
    policy = engine.scheduler.policy
    assert policy.counters["heavy"] == pytest.approx(4 * (20 * 1.0 + 6 * 2.0))
    # light arrived while heavy was active with 20 prompt + 1 token served (22), so it
    # started there rather than at 0, then paid its own 2 prompt + 6 output tokens.
    assert policy.counters["light"] == pytest.approx(22 + 2 * 1.0 + 6 * 2.0)


def test_fair_policy_lifts_returning_client():
    from sluice.runtime.request import Request

    def req(client):
        r = Request.__new__(Request)
        r.client = client
        return r

    policy = FairPolicy()
    policy.counters = {"a": 100.0, "b": 40.0, "idle": 5.0}
    policy.on_add(req("idle"), [req("a"), req("b")])
    assert policy.counters["idle"] == 40.0  # lifted to the least active counter
    policy.on_add(req("a"), [req("a"), req("b")])  # already active: not lifted or lowered
    assert policy.counters["a"] == 100.0
    policy.counters["b"] = 500.0
    policy.on_add(req("b"), [req("a"), req("b")])
    assert policy.counters["b"] == 500.0


def test_bad_policy_values():
    with pytest.raises(ValueError, match="scheduling_policy"):
        make_policy("lottery")
    with pytest.raises(ValueError, match="fair.w_in: must be a finite number >= 0"):
        FairPolicy(w_in=-1)
    with pytest.raises(ValueError, match="fair.w_out: must be a finite number >= 0"):
        FairPolicy(w_out=float("nan"))
    with pytest.raises(ValueError, match="fair.weights: the weight of 'x' must be a finite"):
        FairPolicy(weights={"x": 0})
    with pytest.raises(ValueError, match="fair.weights: the weight of 'y'"):
        FairPolicy(weights={"y": float("inf")})
    with pytest.raises(ValueError, match="fair.weights: must map client names"):
        FairPolicy(weights=[("x", 1.0)])
    with pytest.raises(ValueError, match="fair.weights: applies to the fair policy"):
        make_policy("priority", fair=FairOptions(weights={"x": 2.0}))
    with pytest.raises(ValueError, match="fair: must be a FairOptions"):
        make_policy("fair", fair={"w_in": 1.0})


def test_fair_options_from_the_config_weigh_service(tiny):
    """`EngineConfig`'s fair options reach the policy: with prompt tokens free and
    ``light`` weighted 2, a generated token costs ``light`` half what it costs
    ``heavy``."""
    engine = LLMEngine(tiny, EngineConfig(
        warmup=False, max_model_len=128, scheduling_policy="fair",
        fair=FairOptions(w_in=0.0, w_out=3.0, weights={"light": 2.0})))
    for client in ("heavy", "light"):
        engine.add_request(client, {"prompt_token_ids": [1] * 20},
                           SamplingParams(max_tokens=6, **GREEDY), client=client)
    drain(engine)
    assert engine.scheduler.policy.counters == pytest.approx({"heavy": 18.0, "light": 9.0})


@pytest.mark.parametrize("swap", [False, True], ids=["recompute", "swap"])
def test_priority_under_memory_pressure_keeps_outputs(tiny, swap):
    """A tiny pool forces preemption: the low-priority requests are the ones that
    lose their KV (or swap it out), the urgent one is never preempted, and every
    greedy output equals the one-at-a-time reference."""
    kw = dict(swap_space=64 * 32 * 1024) if swap else {}
    engine = engine_for(tiny, "priority", max_num_seqs=4, kv_cache_memory=10 * 32 * 1024,
                        **kw)
    prompts = {f"low{i}": [10 + i] * 20 for i in range(3)}
    for rid, p in prompts.items():
        engine.add_request(rid, {"prompt_token_ids": p}, SamplingParams(max_tokens=30, **GREEDY),
                           priority=5)
    for _ in range(3):
        engine.step()
    prompts["urgent"] = [3] * 20
    engine.add_request("urgent", {"prompt_token_ids": prompts["urgent"]},
                       SamplingParams(max_tokens=30, **GREEDY), priority=0)
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outs["urgent"].metrics[0].num_preemptions == 0
    assert sum(o.metrics[0].num_preemptions for o in outs.values()) > 0
    assert (engine.stats().num_swap_outs > 0) == swap
    for rid, o in outs.items():
        assert o.outputs[0].token_ids == greedy_generate(tiny, prompts[rid], 30,
                                                         stop_at_eos=False), rid
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_priority_aging_bounds_starvation():
    from sluice.runtime.request import Request
    from sluice.scheduler.policies import PriorityPolicy

    clock = Clock()

    def req(priority, waited, arrival=0.0):
        r = Request.__new__(Request)
        r.priority, r.arrival_time = priority, arrival
        r.waiting_since = clock.now - waited
        return r

    strict, aged = PriorityPolicy(clock=clock), PriorityPolicy(aging_s=1.0, clock=clock)
    old_low, new_high = req(5, 10.0), req(1, 0.0, arrival=1.0)
    running = req(2, 0.0)
    running.waiting_since = None  # running: not aged
    assert strict.next_waiting([old_low, new_high]) is new_high
    assert aged.next_waiting([old_low, new_high]) is old_low  # 5 - 10 s / 1 s < 1
    assert not strict.outranks(old_low, running)
    assert aged.outranks(old_low, running)
    assert not aged.outranks(req(5, 0.5), running)  # 4.5 is still worse than 2
    with pytest.raises(ValueError, match="aging_s"):
        PriorityPolicy(aging_s=0)


@pytest.mark.parametrize("deadline", [None, 0.5], ids=["strict", "resume-deadline"])
def test_resume_deadline_bounds_a_preempted_requests_pause(tiny, deadline):
    """Strict priority leaves a preempted request behind every newer urgent one; with
    a resume deadline it comes back first once it has waited that long, without
    displacing the running request, and is then not displaced again for as long
    (so it finishes here); outputs stay the reference's."""
    engine = engine_for(tiny, "priority", priority=PriorityOptions(resume_deadline_s=deadline))
    engine.scheduler.policy.clock = clock = Clock()
    prompts = {"low": [1, 2, 3, 4], "high1": [9, 8, 7], "high2": [5, 6, 7]}
    engine.add_request("low", {"prompt_token_ids": prompts["low"]},
                       SamplingParams(max_tokens=12, **GREEDY), priority=5)
    for _ in range(3):
        engine.step()
    for rid in ("high1", "high2"):
        engine.add_request(rid, {"prompt_token_ids": prompts[rid]},
                           SamplingParams(max_tokens=6, **GREEDY), priority=0)
    engine.step()  # high1 displaces low
    clock.now += 0.55  # low has now waited past the deadline
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    expected = ["high1", "low", "high2"] if deadline else ["high1", "high2", "low"]
    assert list(outs) == expected
    assert outs["low"].metrics[0].num_preemptions == 1
    assert outs["high1"].metrics[0].num_preemptions == 0
    for rid, o in outs.items():
        n = 12 if rid == "low" else 6
        assert o.outputs[0].token_ids == greedy_generate(tiny, prompts[rid], n,
                                                         stop_at_eos=False), rid
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_displacement_serves_the_request_it_was_made_for(tiny):
    """An overdue preempted request claims free room but never displaces; a more
    urgent waiting request still displaces a running one, and takes its slot."""
    engine = engine_for(tiny, "priority", priority=PriorityOptions(resume_deadline_s=0.05))
    engine.scheduler.policy.clock = clock = Clock()
    params = SamplingParams(max_tokens=8, **GREEDY)
    engine.add_request("low", {"prompt_token_ids": [1, 2, 3]}, params, priority=5)
    engine.step()
    engine.add_request("mid", {"prompt_token_ids": [4, 5, 6]}, params, priority=3)
    engine.step()  # mid displaces low
    clock.now += 0.06  # low is overdue
    engine.add_request("top", {"prompt_token_ids": [7, 8, 9]}, params, priority=0)
    engine.step()  # top displaces mid and runs; low does not take the freed slot
    assert [r.request_id for r in engine.scheduler.running] == ["top"]
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert list(outs)[0] == "top" and set(outs) == {"top", "mid", "low"}
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_priority_option_values():
    for deadline in (0.5, 0.0):  # 0: at once
        policy = make_policy("priority", priority=PriorityOptions(resume_deadline_s=deadline))
        assert policy.resume_deadline_s == deadline
    with pytest.raises(ValueError, match="priority.resume_deadline_s: must be a number >= 0"):
        PriorityOptions(resume_deadline_s=-1.0)
    with pytest.raises(ValueError, match="priority.resume_deadline_s: applies to the priority "
                                         "policy, not 'fair'"):
        make_policy("fair", priority=PriorityOptions(resume_deadline_s=1.0))
    with pytest.raises(ValueError, match="priority.aging_s: applies to the priority policy"):
        make_policy("fcfs", priority=PriorityOptions(aging_s=1.0))
    for bad in (0.0, "5", True, float("nan")):  # strings and booleans were a TypeError or 1 s
        with pytest.raises(ValueError, match="priority.aging_s: must be a number > 0"):
            PriorityOptions(aging_s=bad)
    with pytest.raises(ValueError, match="priority.resume_deadline_s: must be a number >= 0"):
        PriorityOptions(resume_deadline_s="1")
    with pytest.raises(ValueError, match="displace_streaming: applies to the priority policy"):
        make_policy("fair", priority=PriorityOptions(displace_streaming=False))
    with pytest.raises(ValueError, match="displace_streaming: must be true or false"):
        PriorityOptions(displace_streaming="no")
    with pytest.raises(TypeError, match="unknown options 'speed'"):
        make_policy("fair", speed=PriorityOptions())
    # another policy's options at their defaults do nothing, and are accepted
    assert isinstance(make_policy("fair", priority=PriorityOptions(), fair=None), FairPolicy)
    policy = make_policy("priority", fair=FairOptions(),
                         priority=PriorityOptions(aging_s=2.0, displace_streaming=False))
    assert (policy.aging_s, policy.displace_streaming) == (2.0, False)


def test_config_policy_options_refused_with_a_policy_object(tiny):
    from sluice.scheduler.policies import PriorityPolicy

    for field, options in (("priority.aging_s", dict(priority=PriorityOptions(aging_s=1.0))),
                           ("priority.resume_deadline_s",
                            dict(priority=PriorityOptions(resume_deadline_s=0.0))),
                           ("priority.displace_streaming",
                            dict(priority=PriorityOptions(displace_streaming=False))),
                           ("fair.w_in", dict(fair=FairOptions(w_in=0.5))),
                           ("fair.w_out", dict(fair=FairOptions(w_out=1.0))),
                           ("fair.weights", dict(fair=FairOptions(weights={"a": 2.0})))):
        with pytest.raises(ValueError, match=f"{field}: set it on the policy passed in"):
            LLMEngine(tiny, EngineConfig(warmup=False, max_model_len=128, **options),
                      PriorityPolicy())


@pytest.mark.parametrize("displace_streaming", [True, False], ids=["displace", "keep-streaming"])
def test_displace_streaming_off_spares_streaming_requests(tiny, displace_streaming):
    """With displace_streaming=False an urgent request waits for a streaming one
    instead of pausing its stream, but still displaces one that has produced no
    token yet; outputs stay the reference's and no block leaks."""
    engine = engine_for(tiny, "priority",
                        priority=PriorityOptions(displace_streaming=displace_streaming),
                        max_num_batched_tokens=8, max_prefill_seqs=1)
    prompts = {"low": [1, 2, 3, 4], "high": [9, 8, 7], "long": list(range(10, 40))}
    engine.add_request("low", {"prompt_token_ids": prompts["low"]},
                       SamplingParams(max_tokens=10, **GREEDY), priority=5)
    for _ in range(3):
        engine.step()  # low streams
    engine.add_request("high", {"prompt_token_ids": prompts["high"]},
                       SamplingParams(max_tokens=4, **GREEDY), priority=0)
    engine.step()
    running = [r.request_id for r in engine.scheduler.running]
    assert running == (["high"] if displace_streaming else ["low"])
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outs["low"].metrics[0].num_preemptions == (1 if displace_streaming else 0)
    # a request still in its (chunked) prefill has streamed nothing: displaced either way
    engine.add_request("long", {"prompt_token_ids": prompts["long"]},
                       SamplingParams(max_tokens=4, **GREEDY), priority=5)
    engine.step()  # the first 8-token chunk of 30
    engine.add_request("high2", {"prompt_token_ids": prompts["high"]},
                       SamplingParams(max_tokens=4, **GREEDY), priority=0)
    engine.step()
    assert [r.request_id for r in engine.scheduler.running] == ["high2"]
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outs["long"].metrics[0].num_preemptions == 1
    for rid, n in (("low", 10), ("high", 4), ("long", 4), ("high2", 4)):
        prompt = prompts["high" if rid == "high2" else rid]
        assert outs[rid].outputs[0].token_ids == greedy_generate(tiny, prompt, n,
                                                                 stop_at_eos=False), rid
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_resume_deadline_zero_resumes_paused_first():
    """Deadline 0: a request paused mid-generation is admitted before any newer
    or more urgent waiting request, longest-paused first."""
    from sluice.runtime.request import Request
    from sluice.scheduler.policies import PriorityPolicy

    clock = Clock()

    def req(priority, waited, tokens):
        r = Request.__new__(Request)
        r.priority, r.arrival_time = priority, 0.0
        r.waiting_since = clock.now - waited
        r.output_token_ids = [1] * tokens
        return r

    policy = PriorityPolicy(resume_deadline_s=0.0, clock=clock)
    urgent, paused, paused_longer = req(0, 1.0, 0), req(7, 0.001, 3), req(9, 0.01, 2)
    assert policy.next_waiting([urgent, paused, paused_longer]) is paused_longer
    assert policy.displacer([urgent, paused, paused_longer]) is urgent  # displaces by priority
    assert PriorityPolicy(clock=clock).next_waiting([urgent, paused, paused_longer]) is urgent


def test_no_displacement_that_cannot_make_room(tiny):
    """An urgent request that would not fit even if every request it outranks
    went displaces no one: a low-priority prefill holding one block is not
    displaced for a request whose first chunk needs eight."""
    from sluice.runtime.kv_cache import KVCacheSpec

    spec = KVCacheSpec.for_model(tiny.config, 1, 4, tiny.dtype)
    engine = engine_for(tiny, "priority", max_num_seqs=4, block_size=4,
                        max_num_batched_tokens=32, kv_cache_memory=34 * spec.bytes_per_block,
                        enable_prefix_caching=False,
                        priority=PriorityOptions(displace_streaming=False))
    bm, sched = engine.block_manager, engine.scheduler
    assert bm.num_blocks == 34

    def add(rid, first, n, priority):
        engine.add_request(rid, {"prompt_token_ids": list(range(first, first + n))},
                           SamplingParams(max_tokens=40, **GREEDY), priority=priority)

    add("stream", 1, 64, 0)
    engine.step(), engine.step()  # two 32-token chunks, then its first token
    add("second", 70, 58, 1)
    add("low", 130, 40, 9)
    engine.step()  # stream decodes; second takes the other 31 tokens
    engine.step()  # second finishes its prompt (27); low gets the 4 tokens left: 1 block
    low = next(r for r in sched.running if r.request_id == "low")
    assert len(bm.block_table("low")) == 1 and not low.output_token_ids
    assert bm.num_free_blocks + 1 < 8  # the urgent chunk's 8 blocks cannot be had
    add("urgent", 190, 64, 0)
    engine.step()
    assert low.num_displacements == 0
    drain(engine)
    assert bm.num_free_blocks == bm.num_blocks


def test_aging_is_kept_while_running():
    """A request admitted on aged priority is not displaced straight back by the
    request it displaced (which has barely waited)."""
    import time

    from sluice.runtime.request import Request
    from sluice.scheduler.policies import PriorityPolicy

    def req(priority, waiting_since, running_since=None):
        r = Request.__new__(Request)
        r.priority, r.arrival_time = priority, 0.0
        r.waiting_since, r.running_since = waiting_since, running_since
        return r

    now = time.monotonic()
    policy = PriorityPolicy(aging_s=0.1)
    aged = req(9, now - 2.0, running_since=now)  # waited 2 s: ranks as 9 - 20 = -11
    displaced = req(0, now)  # just displaced by it
    assert policy.rank(aged) == pytest.approx(-11.0, abs=0.01)
    assert not policy.outranks(displaced, aged)
    fresh = req(5, now, running_since=now)
    assert policy.outranks(displaced, fresh)  # raw priorities still decide otherwise
    assert policy.victim([aged, fresh]) is fresh
    assert PriorityPolicy().outranks(displaced, aged)  # without aging: raw priority


def test_policy_options_are_stated_once():
    """CLI flags are generated from the options' fields (flag, default, help; one
    flag may span fields), parse back into the options, and EngineConfig's policy
    options default to the options' defaults."""
    import argparse
    import dataclasses

    from sluice.runtime.cli import add_option_flags, option_values
    from sluice.scheduler.policies import OPTIONS, option, parse_pair

    @dataclasses.dataclass(frozen=True)
    class Demo:
        speed: float | None = option(None, "how fast", "--speed", float, "S")
        loud: bool = option(True, "be quiet", "--quiet")
        lo: float = option(1.0, "range", "--range", parse_pair, "LO,HI", span=2)
        hi: float = option(2.5, "top")

    parser = argparse.ArgumentParser()
    add_option_flags(parser.add_argument_group("g"), Demo, "with --demo", "demo")
    assert vars(parser.parse_args([])) == {"demo_speed": None, "demo_loud": True,
                                           "demo_lo": (1.0, 2.5)}
    args = parser.parse_args(["--speed", "2", "--quiet", "--range", "3,4"])
    assert option_values(args, Demo, "demo") == Demo(2.0, False, 3.0, 4.0)
    assert option_values(parser.parse_args([]), Demo, "demo") == Demo()
    text = " ".join(parser.format_help().split())
    assert "with --demo: how fast" in text and "with --demo: range (default: 1,2.5)" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--range", "3"])  # parse_pair's ValueError: a usage error
    defaults = EngineConfig()
    assert {name: getattr(defaults, name) for name in OPTIONS} == \
        {name: cls() for name, cls in OPTIONS.items()}
