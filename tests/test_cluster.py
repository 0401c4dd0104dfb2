"""Multi-instance serving: live migration keeps outputs token-identical and
loses nothing; the global scheduler's dispatch, balancing, draining, scaling
and crash recovery. Instances run on separate CPU devices (conftest forces 4)."""

from __future__ import annotations

import concurrent.futures
import random
import re
import threading
import time

import httpx
import jax
import pytest

from sluice.runtime import SamplingParams, load_model
from sluice.runtime.engine import EngineConfig, LLMEngine
from sluice.runtime.intake import Intake
from sluice.runtime.outputs import RequestFailed
from sluice.scheduler.cluster import Cluster, ClusterConfig, freeness
from sluice.scheduler.instance import LoadReport, LocalInstance, MigrationForwarder
from sluice.scheduler.migration import migrate

GREEDY = dict(temperature=0.0, ignore_eos=True)
ENGINE = dict(block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=512,
              warmup=False, kv_cache_memory=400 * 4 * 1024)
# Waits below are on events (a condition variable); this deadline only turns a hang
# into a failure, and sits far past what any machine load reaches (a 120 s one failed
# at load 6-7).
HANG_GUARD_S = 1800


class Collector:
    """Output sink: keeps every output per request; `wait` until all finished."""

    def __init__(self):
        self.outputs: dict[str, list] = {}
        self.instances: dict[str, set] = {}
        self.cv = threading.Condition()

    def on_outputs(self, name, outputs):
        for out in outputs:
            self.sink(out, name)

    def sink(self, out, name=None):
        with self.cv:
            rid = out.request_id if not isinstance(out, Exception) else "error"
            self.outputs.setdefault(rid, []).append(out)
            self.instances.setdefault(rid, set()).add(name)
            self.cv.notify_all()

    def finished(self, rid):
        outs = self.outputs.get(rid, [])
        return bool(outs) and getattr(outs[-1], "finished", False)

    def wait(self, rids, timeout=HANG_GUARD_S):
        with self.cv:
            assert self.cv.wait_for(lambda: all(self.finished(r) for r in rids), timeout), \
                {r: len(self.outputs.get(r, [])) for r in rids}

    def wait_tokens(self, rid, n, timeout=HANG_GUARD_S):
        with self.cv:
            assert self.cv.wait_for(lambda: self.outputs.get(rid) and len(
                self.outputs[rid][-1].outputs[0].token_ids) >= n, timeout)

    def text(self, rid, i=0):
        return "".join(o.outputs[i].delta for o in self.outputs[rid])


def engine(model, device=0, **kw):
    return LLMEngine(model, EngineConfig(**{**ENGINE, **kw, "device": jax.devices()[device]}))


def reference(model, jobs):
    """Outputs of a single engine that never migrates: {id: final RequestOutput}."""
    eng = LLMEngine(model, EngineConfig(**ENGINE))
    for rid, prompt, params in jobs:
        eng.add_request(rid, prompt, params)
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    return done


def free_blocks_restored(instances):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        reports = [i.report() for i in instances]
        if all(r.num_free_blocks == r.num_blocks and r.num_requests == 0 for r in reports):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=400, **GREEDY),
    SamplingParams(max_tokens=400, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True),
    SamplingParams(max_tokens=400, temperature=0.0, stop=["zz"], seed=1),
    SamplingParams(n=3, max_tokens=300, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True),
], ids=["greedy", "seeded", "stop-string", "n=3-seeded"])
def test_live_migration_is_token_identical(tiny, params):
    """The request moves there and back (with all its completions): each
    completion equals an unmigrated run's; no block leaks."""
    prompt = "live migration must not change a single token"
    want = reference(tiny, [("r", prompt, params)])["r"].outputs
    col = Collector()
    a = LocalInstance("a", engine(tiny, 0), col.on_outputs)
    b = LocalInstance("b", engine(tiny, 1), col.on_outputs)
    try:
        a.submit(a.engine.prepare("r", prompt, params))
        col.wait_tokens("r", 20)
        assert [c[0] for c in a.report().candidates] == ["r"]
        first = migrate(a, b, "r")
        assert first.ok, first
        assert first.stages >= 2 and first.blocks_copied >= 5 * params.n
        if not col.finished("r"):
            back = migrate(b, a, "r")  # and back again (or it finished: "gone")
            assert back.ok or back.reason == "gone", back
        col.wait(["r"])
        got = col.outputs["r"][-1].outputs
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        assert [c.text for c in got] == [c.text for c in want] == \
            [col.text("r", i) for i in range(params.n)]
        assert [c.finish_reason for c in got] == [c.finish_reason for c in want]
        assert len({tuple(c.token_ids) for c in got}) == params.n  # distinct completions
        assert col.instances["r"] >= {"a", "b"}
        assert a.engine.migration.num_out >= 1 and b.engine.migration.num_in >= 1
        assert free_blocks_restored([a, b])
    finally:
        a.stop()
        b.stop()


def test_migration_aborts_cleanly(tiny):
    col = Collector()
    a = LocalInstance("a", engine(tiny, 0), col.on_outputs)
    # A destination too small for the request (20 blocks of 4 tokens, fewer than
    # its prompt alone fills): the first stage finds no room, whatever the timing;
    # the migration aborts and the request finishes on the source, unchanged.
    small = LocalInstance("s", engine(tiny, 2, kv_cache_memory=20 * 8 * 1024, max_model_len=64),
                          col.on_outputs)
    params = SamplingParams(max_tokens=200, **GREEDY)
    want = reference(tiny, [("r", "abc" * 30, params)])["r"]
    try:
        a.submit(a.engine.prepare("r", "abc" * 30, params))
        col.wait_tokens("r", 60)
        res = migrate(a, small, "r")
        assert not res.ok and res.reason.startswith("no room"), res
        assert migrate(a, small, "nonexistent").reason == "not movable"
        two = a.engine.prepare("pair", "a completion is not a request",
                               SamplingParams(n=2, max_tokens=400, **GREEDY))
        a.submit(two)
        col.wait_tokens("pair", 5)
        assert not col.finished("pair")  # running: refused for its id, not for being gone
        assert migrate(a, small, "pair-0").reason == "not movable"  # moves with its group
        col.wait(["r", "pair"])
        assert col.outputs["r"][-1].outputs[0].token_ids == want.outputs[0].token_ids
        assert col.instances["r"] == {"a"}
        assert migrate(a, small, "r").reason == "not movable"  # finished
        assert free_blocks_restored([a, small])
    finally:
        a.stop()
        small.stop()


@pytest.mark.parametrize("when", ["racing", "after-suspend"])
def test_abort_during_migration_leaks_nothing(tiny, when):
    """An abort while the request migrates: racing the copy, or landing once the
    source has suspended it (the handover then completes, and the cluster must
    abort the adopted request on the destination)."""
    col = Collector()
    cluster = Cluster(lambda out, death: [LocalInstance(n, engine(tiny, d), out, death)
                                          for n, d in (("a", 0), ("b", 1))],
                      Intake(tiny, 512, seed=0), ClusterConfig(migrate=False))
    try:
        cluster.submit("r", "to be aborted in flight", SamplingParams(max_tokens=480, **GREEDY),
                       col.sink)
        col.wait_tokens("r", 8)
        src = cluster._records["r"].owner
        dst = "b" if src == "a" else "a"
        if when == "after-suspend":
            source, suspend = cluster.instances[src], cluster.instances[src].suspend

            def suspend_then_abort(*args):
                handover = suspend(*args)
                handover.result()
                cluster.abort("r")
                return handover
            source.suspend = suspend_then_abort
        cluster._start_migration(src, dst, "r")
        if when == "racing":
            cluster.abort("r")
        cluster._executor.shutdown(wait=True)  # the migration has ended, either way
        assert len(cluster.migrations) == 1  # it did start: the abort met a live migration
        if when == "after-suspend":
            assert cluster.migrations[0].ok  # adopted, then aborted on the destination
        # Gone from both engines at once (by the next step boundary, which a no-op
        # call queued after the aborts marks), not just after it would have finished.
        for inst in cluster.instances.values():
            inst._worker.call(lambda engine: None).result(timeout=120)
        assert not any("r" in i.engine.groups for i in cluster.instances.values()), \
            "aborted request still served"
        assert not col.finished("r")
        assert free_blocks_restored(cluster.instances.values())
    finally:
        cluster.shutdown()


def test_migration_storm_loses_nothing(tiny):
    """Random migrations while 12 requests run on 4 instances, two of them aborted
    once running (their blocks freed, their outputs never finished)."""
    rng = random.Random(0)
    jobs = [(f"q{i}", "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(3, 60))),
             SamplingParams(max_tokens=rng.randint(250, 450), **GREEDY)) for i in range(12)]
    want = reference(tiny, jobs)
    col = Collector()
    cluster = Cluster(lambda out, death: [LocalInstance(f"i{d}", engine(
                          tiny, d, kv_cache_memory=800 * 8 * 1024), out, death) for d in range(4)],
                      Intake(tiny, 512, seed=0), ClusterConfig(dispatch="round-robin",
                                                               migrate=False))
    aborted = {"q3", "q8"}
    try:
        for rid, prompt, params in jobs:
            cluster.submit(rid, prompt, params, col.sink)
        for rid, _, _ in jobs:  # the storm starts once every request runs (shapes compiled)
            col.wait_tokens(rid, 1)
            if rid in aborted:  # at once: waiting for the slowest instance's first token
                cluster.abort(rid)  # could let an aborted request finish first
        # A bounded number of storm rounds (not a deadline): a loaded machine only makes
        # the storm and the requests take longer, never fails the test.
        for _ in range(2400):
            if all(col.finished(r) for r, _, _ in jobs if r not in aborted):
                break
            reports = {n: i.report() for n, i in cluster.instances.items()}
            src = rng.choice(list(reports))
            if reports[src].candidates:
                rid = rng.choice(reports[src].candidates)[0]
                dst = rng.choice([n for n in reports if n != src])
                cluster._start_migration(src, dst, rid)
            time.sleep(0.05)
        col.wait([r for r, _, _ in jobs if r not in aborted])
        cluster._executor.submit(lambda: None).result()
        for rid, _, _ in jobs:
            if rid not in aborted:
                got = col.outputs[rid][-1].outputs[0]
                assert got.token_ids == want[rid].outputs[0].token_ids, rid
                assert col.text(rid) == want[rid].outputs[0].text
        reasons = [m.reason for m in cluster.migrations]
        assert len(reasons) >= 3 and "migrated" in reasons, reasons
        assert set(reasons) <= {"migrated", "gone", "not movable", "no room"}, reasons
        assert free_blocks_restored(cluster.instances.values())
        assert not cluster._records  # finished or aborted: nothing left behind
        assert not any(col.finished(r) for r in aborted)  # the aborts took effect
    finally:
        cluster.shutdown()


def test_cluster_set_priority_follows_the_request(tiny):
    """A re-rank reaches the engine that runs the request; one the source may not
    have passed on (recorded while the request moved) is re-sent to the
    destination; unknown ids give False, a bad priority a ValueError."""
    col = Collector()
    cluster = Cluster(lambda out, death: [LocalInstance(f"i{d}", engine(tiny, d), out, death)
                                          for d in range(2)],
                      Intake(tiny, 512, seed=0), ClusterConfig(migrate=False))

    def until_priority(name: str, priority: int) -> None:
        deadline = time.monotonic() + 10
        while cluster.instances[name].engine.groups["r"].requests[0].priority != priority:
            assert time.monotonic() < deadline, (name, priority)
            time.sleep(0.01)

    try:
        cluster.submit("r", "re-rank me", SamplingParams(max_tokens=400, **GREEDY), col.sink)
        col.wait_tokens("r", 5)
        src = cluster._records["r"].owner
        dst = next(n for n in cluster.instances if n != src)
        assert cluster.set_priority("r", 3)
        until_priority(src, 3)
        cluster._records["r"].priority = 7  # as if a change had reached only the source
        assert cluster._migrate(src, dst, "r").ok
        until_priority(dst, 7)
        assert not cluster.set_priority("nobody", 1)
        with pytest.raises(ValueError, match="priority: must be an integer"):
            cluster.set_priority("r", 1.5)
        cluster.abort("r")
        assert free_blocks_restored(cluster.instances.values())
    finally:
        cluster.shutdown()


def report(**kw):
    base = dict(name="x", num_blocks=100, num_free_blocks=60, num_running=4, num_waiting=0,
                demand_blocks=0, num_high_priority=0, draining=False, alive=True, block_size=16)
    return LoadReport(**{**base, **kw})


def test_freeness():
    assert freeness(report()) == 15.0
    assert freeness(report(demand_blocks=40)) == 5.0  # a queued request counts as usage
    assert freeness(report(demand_blocks=100)) < 0
    assert freeness(report(num_high_priority=1), high_priority_headroom=20) == 10.0
    assert freeness(report(draining=True)) == float("-inf")
    assert freeness(report(alive=False)) == float("-inf")
    assert freeness(report(num_running=0)) == 60.0


class FakeInstance:
    """Records submissions; reports a fixed load (dispatch tests need no engine)."""

    def __init__(self, name, **load):
        self.name, self.draining, self.alive = name, False, True
        self.load, self.groups = load, []

    def report(self):
        return report(name=self.name, draining=self.draining, **self.load)

    def submit(self, group):
        self.groups.append(group.request_id)

    def stop(self):
        pass


@pytest.mark.parametrize("policy,expect", [("freest", "c"), ("least-loaded", "b"),
                                           ("round-robin", "a")])
def test_dispatch_policies(tiny, policy, expect):
    insts = [FakeInstance("a", num_free_blocks=10, num_running=1),
             FakeInstance("b", num_free_blocks=50, num_running=0, demand_blocks=45),
             FakeInstance("c", num_free_blocks=90, num_running=3)]
    cluster = Cluster(insts, Intake(tiny, 512, seed=0), ClusterConfig(dispatch=policy))
    cluster.submit("r", "hi", SamplingParams(max_tokens=4), lambda out: None)
    assert [i.name for i in insts if i.groups] == [expect]
    insts[2].draining = True  # never dispatch to a draining instance
    cluster.submit("s", "hi", SamplingParams(max_tokens=4), lambda out: None)
    assert "s" not in insts[2].groups
    second = {"freest": "a", "least-loaded": "b", "round-robin": "b"}[policy]
    assert [i.name for i in insts if "s" in i.groups] == [second]
    with pytest.raises(ValueError, match="request_id"):
        cluster.submit("s", "hi", None, lambda out: None)
    with pytest.raises(ValueError, match="prompt"):
        cluster.submit("t", "", None, lambda out: None)
    with pytest.raises(ValueError, match="dispatch"):
        ClusterConfig(dispatch="random")


def test_conversation_turns_go_where_the_last_turn_finished(tiny):
    """The next turn of a conversation follows its KV (kept in the host memory of the
    instance where the last turn finished), while that instance takes work."""
    from sluice.runtime.outputs import RequestOutput

    insts = [FakeInstance(n, num_free_blocks=50, num_running=0) for n in "abc"]
    cluster = Cluster(insts, Intake(tiny, 512, seed=0), ClusterConfig(dispatch="round-robin"))
    params = SamplingParams(max_tokens=4)
    cluster.submit("t1", "hi", params, lambda out: None, conversation="chat")
    cluster.submit("other", "hi", params, lambda out: None)
    assert insts[0].groups == ["t1"] and insts[1].groups == ["other"]
    cluster.on_outputs("a", [RequestOutput("t1", "hi", [1], [], True, [])])
    cluster.submit("t2", "hi there", params, lambda out: None, conversation="chat")
    assert insts[0].groups == ["t1", "t2"]  # round-robin alone would pick c
    insts[0].draining = True
    cluster.submit("t3", "hi there again", params, lambda out: None, conversation="chat")
    assert "t3" not in insts[0].groups
    with pytest.raises(ValueError, match="conversation: needs n = 1"):
        cluster.submit("t4", "hi", SamplingParams(n=2), lambda out: None, conversation="c")


def test_balancing_migrates_from_full_to_free(tiny):
    """All requests land on one instance; the global scheduler spreads them."""
    col = Collector()
    cfg = ClusterConfig(dispatch="round-robin", migrate=True, migrate_below=20,
                        migrate_above=20, interval_s=0.02)
    made = []

    def instances(out, death):
        made.extend([LocalInstance("full", engine(tiny, 0, kv_cache_memory=64 * 8 * 1024,
                                                       max_model_len=128),
                                   out, death),
                     LocalInstance("free", engine(tiny, 1), out, death)])
        made[1].draining = True  # closed for dispatch until the requests are in
        return made
    cluster = Cluster(instances, Intake(tiny, 512, seed=0), cfg)
    jobs = [(f"b{i}", f"balance me {i}", SamplingParams(max_tokens=110, **GREEDY))
            for i in range(6)]
    want = reference(tiny, jobs)
    try:
        for rid, prompt, params in jobs:
            cluster.submit(rid, prompt, params, col.sink)
        col.wait_tokens("b0", 2)
        made[1].draining = False
        cluster.start()
        col.wait([r for r, _, _ in jobs])
        cluster.shutdown()  # waits for migrations in flight
        assert any(m.source == "full" and m.destination == "free" and m.ok
                   for m in cluster.migrations)
        for rid, _, _ in jobs:
            assert col.outputs[rid][-1].outputs[0].token_ids == want[rid].outputs[0].token_ids
        assert free_blocks_restored(made)
    finally:
        cluster.shutdown()


def test_dead_instance_requests_complete_elsewhere(tiny):
    col = Collector()
    cluster = Cluster(lambda out, death: [LocalInstance(f"i{d}", engine(tiny, d), out, death)
                                          for d in range(2)],
                      Intake(tiny, 512, seed=0), ClusterConfig(dispatch="round-robin",
                                                               migrate=False))
    jobs = [(f"d{i}", f"survive a crash {i}", SamplingParams(max_tokens=60, **GREEDY))
            for i in range(3)] + [("s", "seeded too", SamplingParams(
                max_tokens=60, temperature=1.0, seed=3, ignore_eos=True))]
    want = reference(tiny, jobs)
    try:
        for rid, prompt, params in jobs:
            cluster.submit(rid, prompt, params, col.sink)
        col.wait_tokens("d0", 10)
        victim = cluster._records["d0"].owner
        cluster.instances[victim].kill()
        seen = col.outputs["d0"][-1].metrics[0]  # before the crash
        col.wait([r for r, _, _ in jobs])
        assert cluster.num_redispatched >= 1
        assert "error" not in col.outputs
        final = col.outputs["d0"][-1]
        m = final.metrics[0]  # timings survive the re-dispatch
        assert (m.arrival_time, m.first_token_time) == (seen.arrival_time, seen.first_token_time)
        assert m.token_times[:len(seen.token_times)] == seen.token_times
        assert len(m.token_times) == len(final.outputs[0].token_ids)
        for rid, _, _ in jobs:
            assert col.outputs[rid][-1].outputs[0].token_ids == want[rid].outputs[0].token_ids
            assert col.text(rid) == want[rid].outputs[0].text
        survivor = [i for n, i in cluster.instances.items() if n != victim]
        assert free_blocks_restored(survivor)
    finally:
        cluster.shutdown()


def test_async_cluster_serves_and_sums_stats(tiny):
    """The asyncio front the HTTP server uses: streams complete, early close aborts;
    it says which policy its instances run (None once none is live)."""
    import asyncio

    from sluice.scheduler.async_cluster import AsyncCluster, local_cluster

    want = reference(tiny, [("x", "async cluster", SamplingParams(max_tokens=30, **GREEDY))])
    front = AsyncCluster(local_cluster(tiny, EngineConfig(**ENGINE, scheduling_policy="fair"), 2))
    assert front.scheduling_policy == "fair"

    async def run():
        outs = [o async for o in await front.generate(
            "async cluster", SamplingParams(max_tokens=30, **GREEDY), request_id="x",
            conversation="conv")]
        stream = await front.generate("closed early", SamplingParams(max_tokens=480, **GREEDY),
                                      request_id="closed")
        async for _ in stream:
            break
        await stream.aclose()
        assert "closed" not in front.cluster._records  # aborted, long before it could finish
        with pytest.raises(ValueError, match="max_tokens"):
            await front.generate("bad", SamplingParams(max_tokens=0))
        await asyncio.sleep(0.3)
        stats = front.stats()
        await front.shutdown()
        return outs, stats
    outs, stats = asyncio.run(run())
    assert front.scheduling_policy is None
    assert outs[-1].outputs[0].token_ids == want["x"].outputs[0].token_ids
    assert stats.num_blocks == 2 * front.cluster.instances["instance-0"].report().num_blocks
    assert stats.num_free_blocks == stats.num_blocks and stats.num_running == 0


@pytest.mark.slow
def test_serve_instances_over_http():
    """`sluice serve --instances 2`: the OpenAI client gets the single-engine
    output; /metrics sums the instances (every prompt token was looked up in
    the prefix cache of whichever instance ran it)."""
    import concurrent.futures

    import openai
    from test_server_process import start_server

    def counter(text: str, name: str) -> float:
        found = re.search(rf"^{name}_total{{[^}}]*}} (\S+)$", text, re.M)
        assert found, name
        return float(found.group(1))

    proc, url, _ = start_server("--instances", "2", "--block-size", "4")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")

        def complete(i: int):
            return client.completions.create(model="tiny", prompt=f"two instances {i}",
                                             max_tokens=20, temperature=0,
                                             extra_body={"ignore_eos": True})
        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # spread over both instances
            got = list(pool.map(complete, range(3)))
        model = load_model("tiny")
        want = reference(model, [(str(i), f"two instances {i}",
                                  SamplingParams(max_tokens=20, **GREEDY)) for i in range(3)])
        assert [g.choices[0].text for g in got] == [want[str(i)].outputs[0].text
                                                     for i in range(3)]
        metrics = httpx.get(url + "/metrics").text
        prompt_tokens = sum(len(w.prompt_token_ids) for w in want.values())
        assert counter(metrics, "sluice:prompt_tokens") == prompt_tokens
        assert counter(metrics, "sluice:generation_tokens") == 60
        assert counter(metrics, "sluice:prefix_cache_queries") == prompt_tokens
        assert re.search(r"^sluice:num_requests_running{[^}]*} 0\.0$", metrics, re.M)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt="", max_tokens=5)
        # The admin call re-ranks a stream on whichever instance runs it.
        body = {"model": "tiny", "prompt": "re-rank me", "max_tokens": 200, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            rid = r.headers["x-request-id"]
            ok = httpx.post(url + "/admin/priority", json={"request_id": rid, "priority": 3})
            assert ok.status_code == 200 and ok.json()["engine_requests"] == [rid], ok.text
            assert "'fcfs' ignores priorities" in ok.json()["warning"]  # the instances' policy
        gone = httpx.post(url + "/admin/priority", json={"request_id": rid, "priority": 3})
        assert gone.status_code == 404 and gone.json()["error"]["param"] == "request_id"
    finally:
        proc.terminate()
        proc.wait(30)


def test_drain_migrates_requests_away_then_retires(tiny):
    col = Collector()
    made = []

    def instances(out, death):
        made.extend(LocalInstance(n, engine(tiny, d), out, death) for n, d in (("a", 0), ("b", 1)))
        made[1].draining = True  # everything starts on "a"
        return made
    cluster = Cluster(instances, Intake(tiny, 512, seed=0),
                      ClusterConfig(interval_s=0.02, migrate_below=-1.0, migrate_above=0.0))
    jobs = [(f"m{i}", f"drain me {i}", SamplingParams(max_tokens=450, **GREEDY))
            for i in range(2)]
    want = reference(tiny, jobs)
    try:
        for rid, prompt, params in jobs:
            cluster.submit(rid, prompt, params, col.sink)
        col.wait_tokens("m1", 5)
        made[1].draining = False
        cluster.drain("a")
        cluster.start()
        col.wait([r for r, _, _ in jobs])
        deadline = time.monotonic() + 10
        while "a" in cluster.instances and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "a" not in cluster.instances  # retired once empty
        assert not made[0].alive
        moved = {m.request_id for m in cluster.migrations if m.ok}
        for rid, _, _ in jobs:
            assert col.outputs[rid][-1].outputs[0].token_ids == want[rid].outputs[0].token_ids
        assert moved, [m.reason for m in cluster.migrations]
    finally:
        cluster.shutdown()


class FakeLauncher:
    def __init__(self, prefix):
        self.prefix, self.n = prefix, 0

    def launch(self, on_outputs, on_death):
        self.n += 1
        return FakeInstance(f"{self.prefix}{self.n}", num_free_blocks=90, num_running=0)

    def terminate(self, instance):
        pass


def test_fleet_actuator_applies_plans_and_routes(tiny):
    from sluice.provision.replan import FleetDiff
    from sluice.provision.workload import Buckets
    from sluice.scheduler.fleet import FleetActuator

    cluster = Cluster([FakeInstance("l4-0", num_free_blocks=50, num_running=2)],
                      Intake(tiny, 512, seed=0))
    launches, h100 = [], FakeLauncher("h100-")
    fleet = FleetActuator(cluster, {"L4": FakeLauncher("l4-"), "H100": h100},
                          Buckets((0, 64, 512), (0, 64, 512)), spawn=launches.append)
    fleet.adopt("L4", ["l4-0"])
    assert fleet.counts() == {"L4": 1, "H100": 0}
    fleet.apply(FleetDiff({"H100": 2}, {}, {"L4": 1, "H100": 2}, 1.0, 2.0, "scale_up"))
    # apply only starts the launches (in the background); in flight, they count
    assert len(launches) == 2 and h100.n == 0 and list(cluster.instances) == ["l4-0"]
    assert fleet.counts() == {"L4": 1, "H100": 2}
    seen = []  # the counts as each instance joins: as a launch or as an instance, never both
    typed = fleet._typed
    fleet._typed = lambda inst, t: (typed(inst, t), seen.append(fleet.counts()))
    for launch in launches:
        launch()
    assert seen == [{"L4": 1, "H100": 2}] * 2
    assert fleet.counts() == {"L4": 1, "H100": 2} and len(cluster.instances) == 3
    fleet.route({(0, 0): {"L4": 1.0}, (1, 1): {"H100": 1.0}})
    cluster.submit("short", "hi", SamplingParams(max_tokens=10), lambda out: None)
    cluster.submit("long", "x" * 100, SamplingParams(max_tokens=100), lambda out: None)
    placed = {rid: n for n, i in cluster.instances.items() for rid in i.groups}
    assert placed["short"] == "l4-0" and placed["long"].startswith("h100-")
    fleet.apply(FleetDiff({}, {"H100": 1}, {"L4": 1, "H100": 1}, 2.0, 1.5, "cheaper"))
    assert fleet.counts() == {"L4": 1, "H100": 1}
    assert sum(i.draining for i in cluster.instances.values()) == 1


def test_fleet_replaces_a_dead_instance_with_one_of_its_type(tiny):
    """In a fleet, a dead instance is replaced through its own type's launcher; the
    launch counts for that type while in flight and the fresh instance is typed
    and routed to as it joins (it used to go through the cluster's one launcher,
    untyped, so the fleet neither counted nor routed to it)."""
    from sluice.provision.workload import Buckets
    from sluice.scheduler.fleet import FleetActuator

    spawned, l4, h100 = [], FakeLauncher("l4-"), FakeLauncher("h100-")
    cluster = Cluster([FakeInstance("l4-0", num_free_blocks=50, num_running=0),
                       FakeInstance("h100-0", num_free_blocks=90, num_running=0)],
                      Intake(tiny, 512, seed=0), spawn=spawned.append)
    fleet = FleetActuator(cluster, {"L4": l4, "H100": h100}, Buckets((0, 512), (0, 512)))
    fleet.adopt("L4", ["l4-0"])
    fleet.adopt("H100", ["h100-0"])
    cluster.instances["h100-0"].alive = False
    cluster.on_death("h100-0", RuntimeError("device lost"))
    assert len(spawned) == 1 and "h100-0" not in cluster.instances
    assert fleet.counts() == {"L4": 1, "H100": 1}  # the replacement, in flight
    spawned[0]()
    assert h100.n == 1 and l4.n == 0 and fleet.type_of.get("h100-1") == "H100"
    assert fleet.counts() == {"L4": 1, "H100": 1} and cluster.num_replaced == 1
    fleet.route({(0, 0): {"H100": 1.0}})
    cluster.submit("r", "hi", SamplingParams(max_tokens=10), lambda out: None)
    assert "r" in cluster.instances["h100-1"].groups
    cluster.shutdown()


def test_fleet_replacement_counts_without_a_gap_and_skips_retiring_instances(tiny):
    """A replacement counts as its type's launch before the dead instance is even
    terminated (a scaler looking meanwhile sees no gap to fill); an instance that
    dies while draining is stopped, not replaced; routing never names an instance
    that has left the cluster."""
    from sluice.provision.workload import Buckets
    from sluice.scheduler.fleet import FleetActuator

    seen = []

    class Watching(FakeLauncher):
        def terminate(self, instance):
            seen.append(fleet.counts())

    spawned, h100 = [], Watching("h100-")
    cluster = Cluster([FakeInstance("h100-0", num_free_blocks=90, num_running=0),
                       FakeInstance("h100-x", num_free_blocks=90, num_running=0)],
                      Intake(tiny, 512, seed=0), spawn=spawned.append)
    fleet = FleetActuator(cluster, {"H100": h100}, Buckets((0, 512), (0, 512)))
    fleet.adopt("H100", ["h100-0", "h100-x"])
    cluster.instances["h100-0"].alive = False
    cluster.on_death("h100-0", RuntimeError("device lost"))
    assert seen == [{"H100": 2}] and len(spawned) == 1  # h100-x and the launch, no gap
    cluster.drain("h100-x")
    cluster.instances["h100-x"].alive = False
    cluster.on_death("h100-x", RuntimeError("device lost"))
    assert len(spawned) == 1 and "h100-x" not in cluster.instances  # retired, not replaced
    fleet.route({(0, 0): {"H100": 1.0}})
    group = cluster.intake.prepare("g", "hi", SamplingParams(max_tokens=4))
    assert fleet.eligible(group) is None  # every H100 it knew has gone: no stale names
    spawned[0]()
    assert fleet.eligible(group) == {"h100-1"}
    cluster.shutdown()


@pytest.mark.parametrize("n", [1, 2])
def test_abort_of_a_suspended_request_frees_its_blocks(tiny, n):
    """A client abort that lands between `suspend` and `release`/`resume` frees
    the source's blocks (every completion's) at once; the migration's later
    calls are no-ops."""
    eng = engine(tiny)
    eng.add_request("a", {"prompt_token_ids": [1, 2, 3, 4, 5]},
                    SamplingParams(n=n, max_tokens=40, **GREEDY))
    for _ in range(4):
        eng.step()
    bm = eng.block_manager
    epoch = eng.migration.epoch("a")
    assert epoch is not None and len(epoch.siblings) == len(epoch.probe) == n
    assert eng.migration.suspend("a", {}, epoch) is not None
    assert bm.num_free_blocks < bm.num_blocks and not eng.scheduler.running
    eng.abort_request("a")
    assert bm.num_free_blocks == bm.num_blocks
    eng.migration.release("a")
    assert eng.migration.resume("a") is False
    assert bm.num_free_blocks == bm.num_blocks and not eng.has_unfinished_requests()
    assert eng.migration.num_out == 0


def test_resume_after_suspend_restores_a_group_in_place(tiny):
    """A migration that aborts after `suspend` (the destination refused) puts
    every completion back where it was in the running list; outputs unchanged."""
    params = SamplingParams(n=2, max_tokens=30, temperature=0.9, seed=3, ignore_eos=True)
    jobs = [("x", "before", SamplingParams(max_tokens=30, **GREEDY)), ("g", "group", params),
            ("y", "after", SamplingParams(max_tokens=30, **GREEDY))]
    want = reference(tiny, jobs)
    eng = engine(tiny)
    for rid, prompt, p in jobs:
        eng.add_request(rid, prompt, p)
    for _ in range(3):
        eng.step()
    order = [r.request_id for r in eng.scheduler.running]
    assert {"g-0", "g-1"} <= set(order)
    handover = eng.migration.suspend("g", {}, eng.migration.epoch("g"))
    assert set(handover.num_computed_tokens) == {"g-0", "g-1"}
    assert [r.request_id for r in eng.scheduler.running] == [i for i in order
                                                             if not i.startswith("g-")]
    assert eng.migration.resume("g")
    assert [r.request_id for r in eng.scheduler.running] == order
    done = {}
    while eng.has_unfinished_requests():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    for rid in want:
        assert [c.token_ids for c in done[rid].outputs] == \
            [c.token_ids for c in want[rid].outputs], rid
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


class SteppedInstance(MigrationForwarder):
    """An engine the test steps itself: its migration calls run at once, with no
    engine step in between (the test decides what runs when)."""

    def __init__(self, name, eng):
        self.name, self.engine = name, eng

    def migration_call(self, method, *args):
        future = concurrent.futures.Future()
        try:
            future.set_result(getattr(self.engine.migration, method)(*args))
        except Exception as error:
            future.set_exception(error)
        return future


@pytest.mark.parametrize("unlike", ["block_size=8", "dtype=bfloat16"])
def test_migration_between_unlike_kv_pools_is_refused_before_any_copy(tiny, unlike):
    """A destination whose KV pool is laid out differently (another block size or
    dtype, as instances of another platform have) refuses the migration before a
    block is copied, saying how the pools differ; the request runs on at its
    source token-identically, and neither side keeps a block."""
    prompt, params = "stay where you are", SamplingParams(max_tokens=30, **GREEDY)
    want = reference(tiny, [("r", prompt, params)])["r"].outputs[0].token_ids
    src = engine(tiny, 0)
    if unlike == "block_size=8":
        dst = engine(tiny, 1, block_size=8)
    else:
        dst = LLMEngine(load_model("tiny", dtype="bfloat16"),
                        EngineConfig(**{**ENGINE, "device": jax.devices()[1]}))
    src.add_request("r", prompt, params)
    outputs = [o for _ in range(4) for o in src.step()]
    copies = []
    for eng in (src, dst):
        for name in ("gather", "copy_in"):
            def counted(*args, _call=getattr(eng.runner, name), _name=name):
                copies.append(_name)
                return _call(*args)
            setattr(eng.runner, name, counted)
    result = migrate(SteppedInstance("src", src), SteppedInstance("dst", dst), "r")
    assert not result.ok and "the KV pools differ" in result.reason, result
    assert unlike in result.reason and "this pool's are" in result.reason
    assert result.incompatible and copies == [] and result.blocks_copied == 0
    assert dst.block_manager.num_free_blocks == dst.block_manager.num_blocks
    while src.has_unfinished_requests():
        outputs += src.step()
    assert outputs[-1].finished and outputs[-1].outputs[0].token_ids == want
    assert src.block_manager.num_free_blocks == src.block_manager.num_blocks
    assert src.migration.num_out == 0 and dst.migration.num_in == 0


def test_planner_never_retries_a_pair_whose_pools_differ(tiny, monkeypatch):
    """Once a migration from a to b was refused because their KV pools differ, the
    planner sends a's requests to another destination, or to none, but never to b
    again (it used to retry the same refused pair every round)."""
    import sluice.scheduler.cluster as cluster_mod
    from sluice.scheduler.migration import MigrationResult

    loaded = dict(num_free_blocks=5, num_running=2, candidates=(("r", 4),))
    insts = [FakeInstance("a", **loaded), FakeInstance("b", num_free_blocks=95, num_running=0),
             FakeInstance("c", num_free_blocks=80, num_running=0)]
    cluster = Cluster(insts[:2], Intake(tiny, 512, seed=0),
                      ClusterConfig(migrate=True, migrate_below=20, migrate_above=50))
    reports = lambda: {i.name: i.report() for i in cluster.instances.values()}  # noqa: E731
    assert cluster._plan_migrations(reports()) == [("a", "b", "r")]
    refused = MigrationResult("r", "a", "b", False, "PoolMismatch: the KV pools differ",
                              incompatible=True)
    monkeypatch.setattr(cluster_mod, "migrate", lambda *a, **k: refused)
    cluster._migrate("a", "b", "r")
    assert cluster._plan_migrations(reports()) == []  # b is the only destination
    cluster.instances["c"] = insts[2]
    assert cluster._plan_migrations(reports()) == [("a", "c", "r")]  # b freer, but refused
    cluster.shutdown()


class ManualClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def open_instances(cluster):
    return sorted(n for n, i in cluster.instances.items() if i.alive and not i.draining)


def local_autoscaled(tiny, clock):
    from sluice.runtime.engine import make_intake
    from sluice.scheduler.async_cluster import LocalLauncher

    config = EngineConfig(**ENGINE)
    launcher = LocalLauncher(tiny, config)
    return Cluster(lambda out, death: [launcher.launch(out, death)], make_intake(tiny, config),
                   ClusterConfig(migrate=False), launcher, clock=clock)


def load_then_idle(cluster, col, clock, ticks):
    """Three running requests, then none: ``ticks(phase)`` drives the autoscaler's
    rounds (phase "loaded" while they run, "idle" once they have finished)."""
    jobs = [(f"s{i}", {"prompt_token_ids": [5 + i] * 100},
             SamplingParams(max_tokens=60, **GREEDY)) for i in range(3)]
    for rid, prompt, params in jobs:
        cluster.submit(rid, prompt, params, col.sink)
    for rid, _, _ in jobs:
        col.wait_tokens(rid, 1)  # all running: the load report shows their blocks
    grown = ticks("loaded")
    col.wait([rid for rid, _, _ in jobs])
    shrunk = ticks("idle")
    return grown, shrunk


@pytest.mark.parametrize("kind", ["freeness", "replan"])
def test_autoscaler_scales_a_local_cluster_out_under_load_and_back_in(tiny, tmp_path, kind):
    """Both autoscalers behind one interface: under load the cluster launches a
    second instance, idle it drains one and retires it once empty (the clock is
    the cluster's, injected; rounds are `tick` calls, not a timer)."""
    import numpy as np

    from sluice.provision.profiles import TypeProfile, save_profiles
    from sluice.provision.workload import Buckets
    from sluice.scheduler.autoscale import FreenessAutoscaler, attach

    clock, col = ManualClock(), Collector()
    cluster = local_autoscaled(tiny, clock)
    blocks = next(iter(cluster.instances.values())).report().num_blocks
    if kind == "freeness":  # loaded: ~40 free blocks per running request; idle: all free
        cluster.autoscaler = FreenessAutoscaler(scale_out_below=blocks / 4,
                                                scale_in_above=0.9 * blocks, max_instances=2,
                                                spawn=lambda launch: launch())  # at once
    else:  # 3 requests in a 100 s window = 0.03 req/s, one instance serves 0.02
        path = tmp_path / "profile.json"
        buckets = Buckets((0, 512), (0, 512))
        save_profiles(path, buckets, [TypeProfile("cpu", 1.0, np.full((1, 1), 0.02), "test")])
        scaler = attach(cluster, "replan", max_instances=2, profile_path=str(path),
                        spawn=lambda launch: launch())
        scaler.replanner.window_s = 100.0

    def ticks(phase):
        if phase == "idle":
            clock.now += 100.0  # the arrivals leave the re-planner's window
        sizes = []
        for _ in range(4):  # re-plans 10 s apart (the re-planner's patience is 3)
            cluster.tick()
            sizes.append(len(open_instances(cluster)))
            clock.now += 10.0
        return sizes

    try:
        grown, shrunk = load_then_idle(cluster, col, clock, ticks)
        assert grown[0] == 2 and grown[-1] == 2, grown  # out at once, and no further
        assert shrunk[-1] == 1, shrunk
        cluster.tick()  # the drained instance is empty: retired
        assert len(cluster.instances) == 1
        assert all(col.finished(f"s{i}") for i in range(3))
        assert free_blocks_restored(cluster.instances.values())
    finally:
        cluster.shutdown()


def test_rag_replica_demand_drives_the_autoscaler(tiny):
    """The RAG layer's replica demand (`Capacity.replicas`) is an autoscaler input:
    with every instance idle (freeness alone would scale in), the fleet grows to
    the replicas the RAG SLOs need, and is not drained below them."""
    from sluice.rag.capacity import Capacity
    from sluice.rag.sla import PipelineConfig, Profile
    from sluice.scheduler.autoscale import FreenessAutoscaler

    prof = Profile(PipelineConfig("bm25", 1), 0.5, 0.5, 1e-7, 0.25)
    capacity = Capacity({"c": 1.0}, window_s=10.0, hold_s=30.0)
    launcher, launches = FakeLauncher("new-"), []
    cluster = Cluster([FakeInstance("a", num_free_blocks=90, num_running=0)],
                      Intake(tiny, 512, seed=0), ClusterConfig(migrate=False), launcher,
                      autoscaler=FreenessAutoscaler(scale_out_below=1.0, scale_in_above=50.0,
                                                    max_instances=8,
                                                    demands=[capacity.replicas],
                                                    spawn=launches.append))
    cluster.tick()
    assert open_instances(cluster) == ["a"]  # idle, at its minimum: nothing to do
    t = 0.0
    for _ in range(300):  # 10 queries/s of 0.25 s each: several replicas
        t += 0.1
        capacity.arrival("c", t)
    want = capacity.wanted("c", t, prof)
    assert want > 2
    cluster.tick()
    cluster.tick()  # the launches in flight count: none more
    assert len(launches) == want - 1  # the whole shortfall at once, cooldown or not
    for launch in launches:
        launch()
    cluster.tick()
    assert len(open_instances(cluster)) == want and len(launches) == want - 1


class FlakyLauncher(FakeLauncher):
    """Fails its first ``failures`` launches; the next ``dead_on_arrival`` instances
    it launches die before their launch returns (reporting their deaths, as one
    crashing while it starts would); records what it terminates."""

    def __init__(self, prefix, failures=0):
        super().__init__(prefix)
        self.failures, self.terminated = failures, []
        self.dead_on_arrival = 0

    def launch(self, on_outputs, on_death):
        if self.failures:
            self.failures -= 1
            raise RuntimeError("no capacity")
        inst = super().launch(on_outputs, on_death)
        if self.dead_on_arrival:
            self.dead_on_arrival -= 1
            inst.alive = False
            on_death(inst.name, RuntimeError("died while starting"))
        return inst

    def terminate(self, instance):
        self.terminated.append(instance.name)


def test_freeness_autoscaler_launches_in_the_background_and_backs_off(tiny):
    """A round only starts a launch (the global thread never waits for an
    instance to load); the launch in flight counts, so later rounds start no
    second one for the same load; a failing launch is retried after a back-off
    that doubles (5 s, then 10 s), not every round; an instance that arrives
    after shutdown is terminated, not added."""
    from sluice.scheduler.autoscale import FreenessAutoscaler

    clock, launches, launcher = ManualClock(), [], FlakyLauncher("new-", failures=2)
    scaler = FreenessAutoscaler(max_instances=4, spawn=launches.append)
    cluster = Cluster([FakeInstance("a", num_free_blocks=1, num_running=4)],  # full
                      Intake(tiny, 512, seed=0), ClusterConfig(migrate=False), launcher,
                      clock=clock, autoscaler=scaler)

    def rounds_at(*times):
        for t in times:
            clock.now = t
            cluster.tick()

    rounds_at(0.0, 1.0, 2.0)
    assert len(launches) == 1 and scaler.launches.num_pending() == 1 and open_instances(cluster) == ["a"]
    launches[0]()  # fails
    assert scaler.launches.num_pending() == 0 and scaler.launches.failures_in_a_row == 1
    rounds_at(3.0, 7.9)  # backing off until 3 + 5
    assert len(launches) == 1
    rounds_at(8.0)
    assert len(launches) == 2
    launches[1]()  # fails again: 10 s now
    rounds_at(9.0, 18.9)
    assert len(launches) == 2
    rounds_at(19.0)
    assert len(launches) == 3
    launches[2]()  # succeeds
    assert open_instances(cluster) == ["a", "new-1"] and scaler.launches.failures_in_a_row == 0
    assert scaler.launches.num_failed == 2
    cluster.instances["new-1"].load = dict(num_free_blocks=1, num_running=4)  # full too
    rounds_at(20.0)  # cooling down after the launch at 19
    assert len(launches) == 3
    rounds_at(49.0)
    assert len(launches) == 4
    cluster.shutdown()
    launches[3]()  # lands after shutdown: stopped, not served
    assert launcher.terminated == ["new-2"] and "new-2" not in cluster.instances


def test_freeness_autoscaler_counts_a_joining_launch_once(tiny):
    """A launch counts as in flight or as the instance it brought, never both: a
    round run the moment an instance joins sees two instances, not three, so a
    demand grown to three launches the third."""
    from sluice.scheduler.autoscale import FreenessAutoscaler

    class RoundOnJoin(Cluster):
        def add_instance(self, *args, **kwargs):
            added = super().add_instance(*args, **kwargs)
            self.tick()
            return added

    launches, demand = [], [2]
    scaler = FreenessAutoscaler(max_instances=4, demands=[lambda: demand[0]],
                                spawn=launches.append)
    cluster = RoundOnJoin([FakeInstance("a", num_free_blocks=90, num_running=0)],
                          Intake(tiny, 512, seed=0), ClusterConfig(migrate=False),
                          FakeLauncher("new-"), clock=ManualClock(), autoscaler=scaler)
    cluster.tick()
    assert len(launches) == 1  # a and one launch: the demand of two
    demand[0] = 3
    launches[0]()  # new-1 joins, and a round runs at once
    assert open_instances(cluster) == ["a", "new-1"] and len(launches) == 2


def test_replan_autoscaler_launches_in_the_background_and_backs_off(tiny):
    """The re-planner's fleet launches off the round too: a shortfall starts a
    launch and the next rounds, seeing it in flight, start no second one; after a
    failed launch no plan that launches is applied until the back-off (5 s) ends."""
    import numpy as np

    from sluice.provision.profiles import TypeProfile
    from sluice.provision.workload import Buckets
    from sluice.scheduler.autoscale import ReplanAutoscaler
    from sluice.scheduler.fleet import FleetActuator

    clock, launches, launcher = ManualClock(), [], FlakyLauncher("new-", failures=1)
    cluster = Cluster([FakeInstance("a", num_free_blocks=90, num_running=0)],
                      Intake(tiny, 512, seed=0), ClusterConfig(migrate=False), launcher,
                      clock=clock)
    buckets = Buckets((0, 512), (0, 512))
    fleet = FleetActuator(cluster, {"cpu": launcher}, buckets, spawn=launches.append)
    fleet.adopt("cpu", ["a"])
    cluster.autoscaler = ReplanAutoscaler(
        fleet, [TypeProfile("cpu", 1.0, np.full((1, 1), 0.02), "test")], buckets,
        interval_s=1.0, demands={"cpu": [lambda: 2]})

    def rounds_at(*times):
        for t in times:
            clock.now = t
            cluster.tick()

    rounds_at(0.0, 1.0, 2.0)
    assert len(launches) == 1 and launcher.n == 0 and fleet.counts() == {"cpu": 2}
    launches[0]()  # fails
    rounds_at(3.0, 7.0)  # backing off until 3 + 5
    assert len(launches) == 1 and fleet.counts() == {"cpu": 1}
    rounds_at(8.0)
    assert len(launches) == 2
    launches[1]()
    rounds_at(9.0)
    assert open_instances(cluster) == ["a", "new-1"] and len(launches) == 2


def kill(cluster, name):
    """Make a `FakeInstance` of the cluster die, as its death handler would report it."""
    cluster.instances[name].alive = False
    cluster.on_death(name, RuntimeError("boom"))


def replacing_cluster(tiny, names, **config):
    """FakeInstances ``names`` (round-robin), a `FlakyLauncher` for their
    replacements, launches that run only when the test calls them."""
    launches, launcher = [], FlakyLauncher("new-")
    insts = {n: FakeInstance(n, num_free_blocks=90, num_running=0) for n in names}
    cluster = Cluster(list(insts.values()), Intake(tiny, 512, seed=0),
                      ClusterConfig(dispatch="round-robin", migrate=False, quarantine_after=9,
                                    **config), launcher, spawn=launches.append)
    return cluster, insts, launcher, launches


def test_dead_instance_is_replaced_in_the_background(tiny):
    """The death handler only starts the replacement: the dead instance's requests
    go to a survivor at once; with no survivor they wait (not failed) while a
    replacement is launching, go to the first that joins, and fail once every
    launch has failed."""
    cluster, insts, launcher, launches = replacing_cluster(tiny, "ab")
    col = Collector()
    for rid in ("r0", "r1"):
        cluster.submit(rid, "hi", SamplingParams(max_tokens=4), col.sink)
    kill(cluster, "a")
    assert len(launches) == 1 and launcher.n == 0 and set(insts["b"].groups) == {"r0", "r1"}
    launches[0]()
    assert sorted(cluster.instances) == ["b", "new-1"] and cluster.stats().num_replaced == 1
    kill(cluster, "b")  # r0, r1 -> new-1
    kill(cluster, "new-1")  # no survivor: they wait for a replacement
    assert len(launches) == 3 and "error" not in col.outputs
    assert "2 replacement(s) starting" in cluster.health().reason
    launcher.failures = 1
    launches[1]()  # fails; the other is still launching
    assert "error" not in col.outputs and cluster.launches.num_pending() == 1
    launches[2]()
    assert set(cluster.instances["new-2"].groups) == {"r0", "r1"}
    assert cluster.stats().num_replaced == 2 and "error" not in col.outputs
    launcher.failures = 1
    kill(cluster, "new-2")
    launches[3]()  # the only replacement failed: nothing is left to serve them
    assert len(col.outputs["error"]) == 2 and "every instance has died" in str(
        col.outputs["error"][0])
    assert cluster.stats().num_requests == 0


def test_a_replacement_that_dies_before_joining_ends_the_wait(tiny):
    """A replacement that dies between its launch and its join is a failed launch
    (terminated, never served): the requests waiting for an instance go to another
    replacement that joins, or, when none is left launching, fail at once with an
    error naming the deaths -- not at some stream timeout."""
    cluster, _, launcher, launches = replacing_cluster(tiny, "ab")
    col = Collector()
    for rid in ("r0", "r1"):
        cluster.submit(rid, "hi", SamplingParams(max_tokens=4), col.sink)
    kill(cluster, "a")
    kill(cluster, "b")  # no survivor: r0 and r1 wait for one of two replacements
    assert len(launches) == 2
    launcher.dead_on_arrival = 1
    launches[0]()  # new-1 dies before it joins
    assert "new-1" not in cluster.instances and launcher.terminated == ["a", "b", "new-1"]
    assert "error" not in col.outputs and cluster.launches.num_pending() == 1
    assert cluster.launches.failures_in_a_row == 1
    launches[1]()  # new-2 joins: they go to it
    assert set(cluster.instances["new-2"].groups) == {"r0", "r1"}
    assert cluster.stats().num_replaced == 1 and "error" not in col.outputs
    launcher.dead_on_arrival = 1
    kill(cluster, "new-2")
    launches[2]()  # its only replacement dies before joining: nothing is left to come
    errors = col.outputs["error"]
    assert len(errors) == 2 and all(isinstance(e, RequestFailed) for e in errors)
    assert "every instance has died" in str(errors[0]) and "new-2" in str(errors[0])
    assert cluster.stats().num_requests == 0 and cluster.launches.num_pending() == 0
    assert sorted(cluster.instances) == []


def test_shutdown_fails_every_request_it_still_holds(tiny):
    """Shutdown ends each request the cluster holds with an error naming the
    shutdown: those waiting for a replacement (the only survivor is draining, so
    they wait rather than fail) and the one still running, even when another's
    caller has gone; a replacement that lands afterwards is stopped, not served."""
    cluster, insts, launcher, launches = replacing_cluster(tiny, "ab")
    col = Collector()
    for rid in ("waits", "runs"):  # round-robin: waits -> a, runs -> b
        cluster.submit(rid, "hi", SamplingParams(max_tokens=4), col.sink)

    def gone(out):  # a caller whose stream has closed
        raise RuntimeError("event loop is closed")
    cluster.submit("gone", "hi", SamplingParams(max_tokens=4), gone)  # -> a
    cluster.drain("b")
    kill(cluster, "a")
    assert len(launches) == 1 and "error" not in col.outputs
    assert insts["b"].groups == ["runs"]  # not re-dispatched to the draining one
    assert cluster.stats().num_requests == 3
    cluster.shutdown()
    errors = col.outputs["error"]
    assert len(errors) == 2 and all(isinstance(e, RequestFailed) for e in errors)
    assert sorted(str(e) for e in errors) == [
        f"request {rid}: the cluster shut down before it finished" for rid in ("runs", "waits")]
    assert cluster.stats().num_requests == 0
    launches[0]()
    assert "new-1" in launcher.terminated and "new-1" not in cluster.instances
    assert len(col.outputs["error"]) == 2


def test_freeness_autoscaler_cools_down_between_scale_ins(tiny):
    """Idle instances are drained one per cooldown, not one per round."""
    from sluice.scheduler.autoscale import FreenessAutoscaler

    clock = ManualClock()
    insts = [FakeInstance(n, num_free_blocks=90, num_running=0, num_waiting=0) for n in "abc"]
    for inst in insts:  # a drained instance keeps a request, so it stays (draining) in view
        inst.load["num_running"] = 1
    cluster = Cluster(insts, Intake(tiny, 512, seed=0), ClusterConfig(migrate=False),
                      FakeLauncher("new-"), clock=clock,
                      autoscaler=FreenessAutoscaler(cooldown_s=30.0, spawn=lambda f: None))
    for t in (0.0, 1.0, 29.9):
        clock.now = t
        cluster.tick()
    assert len(open_instances(cluster)) == 2
    clock.now = 30.0
    cluster.tick()
    assert len(open_instances(cluster)) == 1
    with pytest.raises(ValueError, match="cooldown_s"):
        FreenessAutoscaler(cooldown_s=-1)
    with pytest.raises(ValueError, match="backoff_s"):
        FreenessAutoscaler(backoff_s=10, max_backoff_s=5)


def test_rag_part_hands_its_replica_demand_to_the_autoscaler(monkeypatch):
    """``sluice serve --autoscale ... --rag-index``: the RAG part gives the autoscaler
    its service's replica demand when the server mounts it."""
    from types import SimpleNamespace

    from sluice.rag import http as rag_http
    from sluice.rag.capacity import Capacity
    from sluice.runtime.server import ServerContext
    from sluice.scheduler.autoscale import FreenessAutoscaler

    capacity = Capacity({"c": 1.0})
    monkeypatch.setattr(rag_http, "load_rag_service",
                        lambda *args: SimpleNamespace(capacity=capacity))
    monkeypatch.setattr(rag_http, "rag_routes", lambda service, wrap, read_body: [])
    scaler = FreenessAutoscaler()
    rag_http.rag_part("index", scaler.add_demand)(ServerContext(None, "tiny", None, None))
    assert scaler.demands == [capacity.replicas] and scaler.demands[0]() == 1


def test_a_request_refused_for_want_of_an_instance_is_not_kept(tiny):
    """A submit with no instance open (all draining) raises, and leaves no record
    behind: the id stays free and the request count does not grow."""
    inst = FakeInstance("a", num_free_blocks=90, num_running=0)
    inst.draining = True
    cluster = Cluster([inst], Intake(tiny, 512, seed=0),
                      ClusterConfig(dispatch="round-robin", migrate=False))
    for _ in range(2):  # the second is not "request_id already in use"
        with pytest.raises(RuntimeError, match="no live instance"):
            cluster.submit("r0", "hi", SamplingParams(max_tokens=4), lambda out: None)
    assert cluster.stats().num_requests == 0
