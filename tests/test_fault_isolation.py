"""A step that raises never takes its batch down with it, and a request that
kills the instances running it is quarantined after the second death.

Faults are injected with a runner wrapper that raises whenever a poisoned
request is in the batch (validation now stops the real poison, ``top_k=2**31``,
at intake). The engine must fail that request alone, with an error naming the
cause, while every other request's output stays token-identical to an
undisturbed run and every KV block comes back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
from typing import Callable

import httpx
import jax
import pytest

from sluice.runtime import AsyncEngine, SamplingParams
from sluice.runtime.engine import EngineConfig, EngineDeadError, LLMEngine, resolve_max_model_len
from sluice.runtime.intake import Intake
from sluice.runtime.outputs import RequestFailed
from sluice.runtime.request import Request
from sluice.runtime.server import OpenAIServer, ServerConfig
from sluice.scheduler.async_cluster import AsyncCluster
from sluice.scheduler.cluster import Cluster, ClusterConfig
from sluice.scheduler.instance import LocalInstance

# 16-token blocks: few block-table widths, so few step shapes to compile
ENGINE = dict(block_size=16, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128,
              warmup=False, seed=0)
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
JOBS = [(f"g{i}", f"a greedy prompt number {i}", GREEDY) for i in range(4)] + [
    ("s", "a seeded one", SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=16,
                                         ignore_eos=True)),
    ("n2", "two seeded completions", SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=12,
                                                    ignore_eos=True)),
]
POISON = "an injected fault in the runner"


class Poison:
    """Wraps an engine's runner: raises whenever a batch holds a row of a request
    ``is_poison`` picks (or, once armed with ``fail_next``, on the next call
    whatever the batch holds)."""

    def __init__(self, engine: LLMEngine, is_poison: Callable[[Request], bool] = lambda r: False):
        self.is_poison = is_poison
        self.inner = engine.runner.execute
        self.fail_next = 0
        engine.runner.execute = self

    def __call__(self, batch, during=None, *rest):
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("a transient fault")
        if any(self.is_poison(r.request) for r in batch):
            raise OverflowError(POISON)
        return self.inner(batch, during, *rest)


def by_id(*request_ids: str) -> Callable[[Request], bool]:
    return lambda req: req.parent_id in request_ids


def by_prompt(engine: LLMEngine, marker: str) -> Callable[[Request], bool]:
    return lambda req: marker in engine.model.tokenizer.decode(req.prompt_token_ids)


def run(engine: LLMEngine, jobs, late=(), late_after: int = 3) -> dict:
    """Final outputs by id; ``late`` jobs join after ``late_after`` steps."""
    for rid, prompt, params in jobs:
        engine.add_request(rid, prompt, params)
    done, steps = {}, 0
    while engine.has_unfinished_requests() or (late and steps <= late_after):
        if steps == late_after:
            for rid, prompt, params in late:
                engine.add_request(rid, prompt, params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        steps += 1
    return done


def tokens(out) -> list[list[int]]:
    return [c.token_ids for c in out.outputs]


@pytest.fixture(scope="module")
def reference(tiny):
    return run(LLMEngine(tiny, EngineConfig(**ENGINE)), JOBS)


def test_a_poison_request_fails_alone_and_the_rest_are_token_identical(tiny, reference):
    engine = LLMEngine(tiny, EngineConfig(**ENGINE))
    Poison(engine, by_id("p0", "p1"))
    free = engine.block_manager.num_free_blocks
    poison = SamplingParams(max_tokens=8)
    done = run(engine, JOBS + [("p0", "poison from the start", poison)],
               late=[("p1", "poison mid-run", poison)])
    for rid in ("p0", "p1"):
        assert done[rid].finished and POISON in done[rid].error
        assert all(c.finish_reason == "abort" for c in done[rid].outputs)
    for rid, _, _ in JOBS:
        assert done[rid].error is None
        assert tokens(done[rid]) == tokens(reference[rid]), rid
        assert [c.text for c in done[rid].outputs] == [c.text for c in reference[rid].outputs]
    assert engine.block_manager.num_free_blocks == free
    assert engine.stats().num_failed_requests == 2 and engine.dead is None
    again = run(engine, JOBS[:1])  # and it keeps serving
    assert tokens(again["g0"]) == tokens(reference["g0"])


def test_a_transient_fault_fails_no_one(tiny, reference):
    engine = LLMEngine(tiny, EngineConfig(**ENGINE))
    poison = Poison(engine)
    for rid, prompt, params in JOBS:
        engine.add_request(rid, prompt, params)
    for _ in range(3):
        engine.step()
    poison.fail_next = 1
    done = run(engine, [])
    assert poison.fail_next == 0
    for rid, _, _ in JOBS:
        assert done[rid].error is None and tokens(done[rid]) == tokens(reference[rid])
    poison.fail_next = 1  # alone in its step, a transient fault still fails no one
    alone = run(engine, JOBS[:1])
    assert alone["g0"].error is None and tokens(alone["g0"]) == tokens(reference["g0"])
    assert engine.stats().num_failed_requests == 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_fault_that_loses_the_kv_pool_kills_the_engine(tiny):
    engine = LLMEngine(tiny, EngineConfig(**ENGINE))
    inner = engine.runner.execute

    def lose_pool(batch, during=None, *rest):
        for leaf in jax.tree_util.tree_leaves(engine.runner.kv_cache):
            leaf.delete()
        raise RuntimeError("device lost")
    engine.runner.execute = lose_pool
    engine.add_request("a", "hello", GREEDY)
    with pytest.raises(EngineDeadError, match="KV pool was lost.*device lost"):
        engine.step()
    engine.runner.execute = inner
    with pytest.raises(EngineDeadError):  # for good: nothing runs on a lost pool
        engine.step()


def test_async_engine_and_http_fail_only_the_poisoned_request(tiny, reference):
    engine = LLMEngine(tiny, EngineConfig(**ENGINE))
    Poison(engine, by_id("cmpl-poison"))
    server = OpenAIServer(AsyncEngine(engine), ServerConfig("tiny"))

    async def main():
        async def stream_poison():
            gen = await server.engine.generate("poison", SamplingParams(max_tokens=4),
                                               request_id="cmpl-poison")
            with pytest.raises(RequestFailed, match=POISON):
                async for _ in gen:
                    pass
        transport = httpx.ASGITransport(app=server.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t",
                                     timeout=120) as c:
            bodies = [{"prompt": p, "max_tokens": GREEDY.max_tokens, "temperature": 0,
                       "ignore_eos": True}
                      for _, p, _ in JOBS[:4]]
            *good, _ = await asyncio.gather(
                *[c.post("/v1/completions", json=b) for b in bodies], stream_poison())
            return good
    good = asyncio.run(main())
    for (rid, _, _), r in zip(JOBS, good):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == reference[rid].outputs[0].text
    assert engine.stats().num_failed_requests == 1
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_http_poison_is_a_500_naming_the_cause(tiny):
    engine = LLMEngine(tiny, EngineConfig(**ENGINE))
    Poison(engine, by_prompt(engine, "POISON"))
    server = OpenAIServer(AsyncEngine(engine), ServerConfig("tiny"))

    async def main():
        transport = httpx.ASGITransport(app=server.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t",
                                     timeout=120) as c:
            bad = {"prompt": "POISON", "max_tokens": 2}
            return (await c.post("/v1/completions", json=bad),
                    await c.post("/v1/completions", json={**bad, "stream": True}),
                    await c.post("/v1/completions", json={"prompt": "fine", "max_tokens": 2}))
    plain, streamed, ok = asyncio.run(main())
    assert plain.status_code == 500, plain.text
    assert POISON in plain.json()["error"]["message"]
    assert POISON in streamed.text and streamed.text.rstrip().endswith("data: [DONE]")
    assert ok.status_code == 200


# -- the cluster ----------------------------------------------------------------------

class Sink:
    """Collects each request's outputs (or the exception that ended it)."""

    def __init__(self):
        self.outputs: dict[str, list] = {}
        self.cv = threading.Condition()

    def __call__(self, rid: str):
        def sink(out):
            with self.cv:
                self.outputs.setdefault(rid, []).append(out)
                self.cv.notify_all()
        return sink

    def ended(self, rid: str) -> bool:
        outs = self.outputs.get(rid)
        return bool(outs) and (isinstance(outs[-1], Exception) or outs[-1].finished)

    def wait(self, *rids: str, timeout: float = 300) -> None:
        with self.cv:
            assert self.cv.wait_for(lambda: all(self.ended(r) for r in rids), timeout), \
                {r: self.outputs.get(r, [])[-1:] for r in rids}

    def last(self, rid: str):
        return self.outputs[rid][-1]


class LethalLauncher:
    """Launches instances whose engine dies (as a crashed process would) whenever
    a request whose prompt holds ``marker`` runs in it; ``runner_fault`` instead
    makes only the runner raise (the engine's own isolation handles that). All
    on the default device, so they share its compiled steps."""

    def __init__(self, model, config, marker: str, runner_fault: bool = False):
        self.model, self.config = model, config
        self.marker, self.runner_fault = marker, runner_fault
        self.launched: list[str] = []
        self._count = itertools.count()  # replacements may launch on two threads at once

    def launch(self, on_outputs, on_death) -> LocalInstance:
        name = f"instance-{next(self._count)}"
        engine = LLMEngine(self.model, self.config)
        is_poison = by_prompt(engine, self.marker)
        if self.runner_fault:
            Poison(engine, is_poison)
        else:
            step = engine.step

            def lethal_step():
                if any(is_poison(r) for r in engine.scheduler.running):
                    raise EngineDeadError(f"{POISON} killed {name}")
                return step()
            engine.step = lethal_step
        self.launched.append(name)
        return LocalInstance(name, engine, on_outputs, on_death)

    def terminate(self, instance: LocalInstance) -> None:
        instance.stop()


def make_cluster(tiny, launcher: LethalLauncher, n: int = 2, **cfg) -> Cluster:
    config = EngineConfig(**ENGINE)
    intake = Intake(tiny, resolve_max_model_len(tiny, config), config.seed)
    return Cluster(lambda out, death: [launcher.launch(out, death) for _ in range(n)], intake,
                   ClusterConfig(dispatch="round-robin", migrate=False, **cfg), launcher)


def all_blocks_free(cluster: Cluster) -> bool:
    return all(r.num_free_blocks == r.num_blocks and r.num_requests == 0
               for r in cluster.stats().instances.values() if r.alive)


def test_a_request_that_kills_instances_is_quarantined_after_the_second_death(tiny, reference):
    launcher = LethalLauncher(tiny, EngineConfig(**ENGINE), "LETHAL")
    cluster = make_cluster(tiny, launcher)
    sink = Sink()
    try:
        # round-robin: A -> instance-0, the poison alone -> instance-1, B -> instance-0
        for rid, prompt in (("g0", JOBS[0][1]), ("P", "LETHAL"), ("g1", JOBS[1][1])):
            cluster.submit(rid, prompt, GREEDY, sink(rid))
        sink.wait("g0", "g1", "P")
        err = sink.last("P")
        assert isinstance(err, RequestFailed) and "quarantined" in str(err)
        assert "instance-1" in str(err) and "instance-0" in str(err) and POISON in str(err)
        for rid in ("g0", "g1"):  # re-dispatched once, then served token-identically
            assert tokens(sink.last(rid)) == tokens(reference[rid])
        # replacements launch in the background: the second may still be starting
        assert cluster.launches.wait_idle(120)
        stats = cluster.stats()
        assert (stats.num_deaths, stats.num_quarantined, stats.num_replaced) == (2, 1, 2)
        assert stats.num_redispatched == 3  # P once, g0 and g1 once each
        assert sorted(launcher.launched) == [f"instance-{i}" for i in range(4)]
        health = cluster.health()
        assert health.ok and health.serving == 2 and health.dead == 0
        assert sorted(cluster.instances) == ["instance-2", "instance-3"]
        cluster.submit("after", JOBS[2][1], GREEDY, sink("after"))  # still serving
        sink.wait("after")
        assert tokens(sink.last("after")) == tokens(reference["g2"])
        assert all_blocks_free(cluster)
    finally:
        cluster.shutdown()


def test_a_runner_fault_in_a_cluster_fails_the_request_not_the_instance(tiny, reference):
    launcher = LethalLauncher(tiny, EngineConfig(**ENGINE), "POISON", runner_fault=True)
    cluster = make_cluster(tiny, launcher)
    sink = Sink()
    try:
        for rid, prompt in (("g0", JOBS[0][1]), ("P", "POISON"), ("g1", JOBS[1][1])):
            cluster.submit(rid, prompt, GREEDY, sink(rid))
        sink.wait("g0", "g1", "P")
        assert isinstance(sink.last("P"), RequestFailed) and POISON in str(sink.last("P"))
        for rid in ("g0", "g1"):
            assert tokens(sink.last(rid)) == tokens(reference[rid])
        stats = cluster.stats()
        assert (stats.num_deaths, stats.num_redispatched) == (0, 0)
        assert all_blocks_free(cluster)
    finally:
        cluster.shutdown()


def test_health_is_503_and_metrics_show_dead_instances_when_none_can_serve(tiny):
    config = EngineConfig(**ENGINE)
    cluster = Cluster(lambda out, death: [
        LocalInstance(f"i{d}", LLMEngine(tiny, dataclasses.replace(
            config, device=jax.devices()[d])), out, death) for d in range(2)],
        Intake(tiny, resolve_max_model_len(tiny, config), 0), ClusterConfig(migrate=False))
    front = AsyncCluster(cluster)
    server = OpenAIServer(front, ServerConfig("tiny"))

    async def get(path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=server.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.get(path)
    try:
        assert asyncio.run(get("/health")).status_code == 200
        cluster.instances["i0"].kill()
        deadline = time.monotonic() + 60
        while cluster.instances["i0"].alive and time.monotonic() < deadline:
            time.sleep(0.01)
        assert asyncio.run(get("/health")).status_code == 200  # i1 still serves
        text = asyncio.run(get("/metrics")).text
        assert 'sluice:num_instances{model_name="tiny",state="dead"} 1.0' in text
        assert 'sluice:num_instances{model_name="tiny",state="serving"} 1.0' in text
        cluster.instances["i1"].kill()
        while cluster.instances["i1"].alive and time.monotonic() < deadline:
            time.sleep(0.01)
        r = asyncio.run(get("/health"))
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["serving"] == 0 and body["dead"] == 2 and body["deaths"] == 2
        assert "i0 died" in body["reason"] and "i1 died" in body["reason"]
        assert "killed" in body["reason"]
        text = asyncio.run(get("/metrics")).text
        assert 'sluice:num_instances{model_name="tiny",state="dead"} 2.0' in text
        assert 'sluice:num_instance_deaths_total{model_name="tiny"} 2.0' in text
        assert 'sluice:kv_cache_usage_perc{model_name="tiny"} 0.0' in text
    finally:
        asyncio.run(front.shutdown())


def test_health_is_503_when_the_single_engine_is_dead(tiny):
    engine = LLMEngine(tiny, EngineConfig(**ENGINE))
    server = OpenAIServer(AsyncEngine(engine), ServerConfig("tiny"))
    engine.dead = "the KV pool was lost in a failed step (RuntimeError: device lost)"

    async def get(path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=server.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.get(path)
    r = asyncio.run(get("/health"))
    assert r.status_code == 503 and "device lost" in r.json()["reason"]
    assert 'state="dead"} 1.0' in asyncio.run(get("/metrics")).text
