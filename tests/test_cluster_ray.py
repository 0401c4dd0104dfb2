"""Instances as Ray actors (a local Ray cluster): dispatch, live migration across
processes, and recovery from a crashed actor, all token-identical to one engine;
the actors share a compilation cache, report their compiles to the driver, and
compute embeddings, so the driver never holds the weights."""

from __future__ import annotations

import os

import numpy as np
import pytest
import ray

from sluice.runtime import SamplingParams, compiles
from sluice.runtime.embed import buckets, mean_pooled
from sluice.runtime.engine import EngineConfig, make_intake
from sluice.runtime.metrics import ServerMetrics
from sluice.scheduler.async_cluster import AsyncCluster
from sluice.scheduler.cluster import Cluster, ClusterConfig
from sluice.scheduler.instance import InstanceDied, LoadReport
from sluice.scheduler.migration import migrate
from sluice.scheduler.ray_instance import ModelSpec, ray_cluster
from test_cluster import ENGINE, GREEDY, Collector, free_blocks_restored, reference


def test_weight_free_model_prepares_requests_and_loads_its_weights_on_first_use(
        tiny, monkeypatch):
    """``load_model(weights=False)`` (the Ray driver's): an intake tokenizes and
    validates with it without building parameters; the first ``params`` access
    builds them once, equal to a full load's."""
    from sluice.runtime import loader

    built, init_params = [], loader.init_params
    monkeypatch.setattr(loader, "init_params", lambda *a: built.append(a) or init_params(*a))
    model = loader.load_model("tiny", "float32", weights=False)
    group = make_intake(model, EngineConfig(**ENGINE)).prepare(
        "r", "a prompt", SamplingParams(max_tokens=4))
    assert group.requests[0].prompt_token_ids == tiny.tokenizer.encode("a prompt")
    assert model.eos_token_ids == tiny.eos_token_ids and not model.loaded and not built
    params = model.params
    assert model.params is params and model.loaded and len(built) == 1
    np.testing.assert_array_equal(np.asarray(params["embed"]), np.asarray(tiny.params["embed"]))


class EmbeddingInstance:
    """An instance that only computes embeddings: ``vector``, or dies first (None)."""

    def __init__(self, name: str, num_running: int, vector: np.ndarray | None):
        self.name, self.num_running, self.vector = name, num_running, vector
        self.alive, self.draining, self.calls = True, False, []

    def report(self) -> LoadReport:
        return LoadReport(self.name, 8, 8, self.num_running, 0, 0, 0, self.draining,
                          self.alive, 4)

    def embed(self, token_ids: list[int]) -> np.ndarray:
        self.calls.append(token_ids)
        if self.vector is None:
            self.alive = False
            raise InstanceDied(f"{self.name} died during an embedding")
        return self.vector

    def stop(self) -> None:
        self.alive = False


def test_an_embedding_goes_to_the_least_loaded_open_instance_and_survives_its_death(tiny):
    """`AsyncCluster.embed` (the server's ``/v1/embeddings`` under ``--instances``):
    the least loaded open instance computes it; one that dies first hands it to the
    next; with none left open, a clear error."""
    vector = np.ones(4, np.float32)
    dies, busy = EmbeddingInstance("dies", 0, None), EmbeddingInstance("busy", 2, vector)
    drains = EmbeddingInstance("drains", 0, vector)
    drains.draining = True
    cluster = Cluster([busy, dies, drains], make_intake(tiny, EngineConfig(**ENGINE)),
                      ClusterConfig(migrate=False))
    try:
        front = AsyncCluster(cluster)
        assert front.embed([1, 2]) is vector
        assert (dies.calls, busy.calls, drains.calls) == ([[1, 2]], [[1, 2]], [])
        busy.vector = None
        with pytest.raises(RuntimeError, match="no live instance"):
            front.embed([3])
    finally:
        cluster.shutdown()


def test_a_later_actor_waits_for_the_first_before_loading_the_model(monkeypatch, tmp_path):
    """An `EngineActor` given other actors' ``ready`` refs waits for them before it
    loads the model, so the load's compiled programs come from the cache the first
    filled (loading beside the first's warm-up would compile them again, on cores
    it keeps busy). Ray's ``get`` and the load are intercepted: what is under test
    is their order; the load stops the constructor."""
    from sluice.scheduler import ray_instance

    class Stop(Exception):
        pass

    events: list[object] = []

    def load(*args, **kwargs):
        events.append("load")
        raise Stop

    monkeypatch.setattr(ray_instance.ray, "get", lambda refs: events.append(list(refs)))
    monkeypatch.setattr(ray_instance, "load_model", load)
    monkeypatch.setattr(ray_instance, "enable_compile_cache", lambda d: events.append(d))
    spec = ModelSpec("tiny", "float32", compile_cache=str(tmp_path))
    with pytest.raises(Stop):
        ray_instance.EngineActor("ray-x", spec, EngineConfig(**ENGINE), ["first-ready"])
    assert events == [str(tmp_path), ["first-ready"], "load"]


def test_local_actors_compile_on_their_share_of_the_cpus(monkeypatch):
    """Actors on this host split its CPUs for their warm-up compiles (unless the
    spec or ``$SLUICE_COMPILE_THREADS`` says otherwise), and an actor applies its
    spec's count to its own process before anything compiles."""
    from sluice.scheduler import ray_instance

    monkeypatch.delenv("SLUICE_COMPILE_THREADS", raising=False)
    monkeypatch.setattr(ray_instance.os, "sched_getaffinity", lambda _: set(range(4)))
    spec = ModelSpec("tiny")
    assert [ray_instance.local_compile_threads(spec, n).compile_threads
            for n in (1, 2, 3, 8)] == [4, 2, 1, 1]
    assert ray_instance.local_compile_threads(
        ModelSpec("tiny", compile_threads=3), 2).compile_threads == 3
    monkeypatch.setenv("SLUICE_COMPILE_THREADS", "5")
    assert ray_instance.local_compile_threads(spec, 2).compile_threads is None

    class Stop(Exception):
        pass

    def load(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(ray_instance, "load_model", load)
    with pytest.raises(Stop):
        ray_instance.EngineActor("ray-x", ModelSpec("tiny", compile_threads=1),
                                 EngineConfig(**ENGINE))
    assert os.environ["SLUICE_COMPILE_THREADS"] == "1"
    assert compiles.compile_threads() == 1


def test_launch_orders_the_actors_start_up_phases(monkeypatch):
    """`RayLauncher.launch_many` with a cache: the later actors load after the
    first's ``ready`` (its engine warmed up), their embedding warm-ups wait for the
    first's, and the launch returns only once every actor's has finished; without
    a cache nothing waits. Actors are stand-ins recording what they are given."""
    from sluice.scheduler import ray_instance

    calls: list[tuple] = []

    class Method:
        def __init__(self, actor, name):
            self.actor, self.name = actor, name

        def remote(self, *args):
            calls.append((self.actor, self.name, *args))
            return f"{self.actor}.{self.name}"

    class Actor:
        def __init__(self, name, after=()):
            self.name = name
            calls.append((name, "init", *after))

        def __getattr__(self, method):
            return Method(self.name, method)

    class ActorClass:
        def remote(self, name, spec, config, after=()):
            return Actor(name, after)

    monkeypatch.setattr(ray_instance, "RayInstance", lambda name, actor, *_: name)
    monkeypatch.setattr(ray_instance.ray, "get", lambda refs: calls.append(("get", *refs)))
    for cache in ("/cache", None):
        calls.clear()
        launcher = ray_instance.RayLauncher(ModelSpec("tiny", compile_cache=cache),
                                            EngineConfig(**ENGINE))
        launcher._actor_class = ActorClass()
        names = launcher.launch_many(3, None, None)
        a, b, c = names
        if cache:
            starts = [(a, "ready"), (b, "init", f"{a}.ready"),
                      (a, "ready"), (c, "init", f"{a}.ready")]
        else:
            starts = [(b, "init"), (c, "init")]
        after = [f"{a}.warm_embeddings"] if cache else []
        assert calls == [
            (a, "init"), (a, "warm_embeddings"), *starts,
            (b, "warm_embeddings", after), (c, "warm_embeddings", after),
            ("get", f"{a}.warm_embeddings", f"{b}.warm_embeddings", f"{c}.warm_embeddings")]


def _cache_dir(actor) -> str:
    """The persistent compilation cache directory JAX uses in ``actor``'s process."""
    return ray.get(actor.__ray_call__.remote(
        lambda self: __import__("jax").config.jax_compilation_cache_dir))


def _compile_kept(actor, salt: int) -> None:
    """Compile, in ``actor``'s process, a program new to the cache (``salt``: a
    constant in it, distinct per call), kept however short its compile (the
    minimum compile time set to 0 there)."""
    def compile_new(self, salt):
        import jax
        import numpy as np
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.jit(lambda x: x * 7 + salt)(np.ones(3, np.float32))

    ray.get(actor.__ray_call__.remote(compile_new, salt))


@pytest.mark.slow
def test_ray_instances_migrate_and_survive_a_crash(tiny, tmp_path):
    config = EngineConfig(**ENGINE)
    cache = tmp_path / "jax"
    cluster = ray_cluster(ModelSpec("tiny", "float32", compile_cache=str(cache)), config, 2,
                          ClusterConfig(dispatch="round-robin", migrate=False))
    col = Collector()
    jobs = [(f"r{i}", f"ray instance {i}", SamplingParams(max_tokens=480, **GREEDY))
            for i in range(3)]
    try:
        # The driver's intake has the tokenizer and config, not the weights; both
        # actors use the compilation cache the driver chose, and write to it (a
        # compile of any length, here: whether this config's own were long enough
        # to be kept depends on the machine's speed).
        assert not cluster.intake.model.loaded
        assert [_cache_dir(i.actor) for i in cluster.instances.values()] == [str(cache)] * 2
        for salt, instance in enumerate(cluster.instances.values()):
            entries = len(list(cache.iterdir()))
            _compile_kept(instance.actor, salt)
            assert len(list(cache.iterdir())) > entries
        want = reference(tiny, jobs)
        for rid, prompt, params in jobs:
            cluster.submit(rid, prompt, params, col.sink)
        # Block copies compile on first use in each actor, so a first try may chase
        # a request that finishes before the copies converge, or soon after: retry on
        # fresh ones until a migrated request is still running on its new instance.
        for attempt in range(6):
            rid = f"m{attempt}"
            params = SamplingParams(max_tokens=480, **GREEDY)
            cluster.submit(rid, f"migrate me {attempt}", params, col.sink)
            col.wait_tokens(rid, 10)
            src = cluster._records[rid].owner
            dst = next(n for n in cluster.instances if n != src)
            result = migrate(cluster.instances[src], cluster.instances[dst], rid)
            if result.ok:
                cluster._records[rid].owner = dst
                jobs.append((rid, f"migrate me {attempt}", params))
                want.update(reference(tiny, [jobs[-1]]))
                if not col.finished(rid):
                    break
        assert result.ok, result
        assert result.stages >= 2
        # Crash the actor now serving the migrated request: it completes elsewhere.
        assert not col.finished(rid)
        cluster.instances[dst].kill()
        col.wait([r for r, _, _ in jobs])
        assert cluster.num_redispatched >= 1
        for rid, _, _ in jobs:
            assert col.outputs[rid][-1].outputs[0].token_ids == want[rid].outputs[0].token_ids
            assert col.text(rid) == want[rid].outputs[0].text
        assert free_blocks_restored([i for i in cluster.instances.values() if i.alive])
        # An embedding (the server's /v1/embeddings) runs on a live actor, not in the
        # driver, which still holds no weights: the same vector as the full model's.
        ids = cluster.intake.model.tokenizer.encode("embed me")
        np.testing.assert_allclose(AsyncCluster(cluster).embed(ids), mean_pooled(tiny, ids),
                                   rtol=1e-5, atol=1e-6)
        assert not cluster.intake.model.loaded
    finally:
        cluster.shutdown()
        ray.shutdown()


# Warmed up, with few shapes to warm (as in test_compiles).
WARM = EngineConfig(warmup=True, max_model_len=32, max_num_seqs=1, max_num_batched_tokens=16,
                    max_prefill_seqs=1, seed=0)


@pytest.mark.slow
def test_ray_actor_reports_its_compiles_and_serves_embeddings_without_compiling(tiny):
    """The actor's warm-up compiles (its engine's and its embeddings') are in the
    driver's counts and its ``sluice:compiles_total``; after warm-up, an embedding
    (computed in the actor: the driver still holds no weights) and a request
    compile nothing in the actor."""
    cluster = ray_cluster(ModelSpec("tiny", "float32"), WARM, 1)
    try:
        front = AsyncCluster(cluster)
        (name,) = cluster.instances
        warm = compiles.remote(name)
        assert {reason for reason, _ in warm} <= {"warmup", "startup"}, warm
        embeddings = ("warmup", "jit(_pooled)")  # one program per bucket
        assert warm.get(embeddings) == len(buckets(WARM.max_model_len)), warm
        assert sum(n for (reason, _), n in warm.items() if reason == "warmup") > \
            warm[embeddings]  # the engine's step programs too
        metrics = ServerMetrics("tiny")
        metrics.render(front.stats())
        for (reason, function), n in warm.items():
            assert metrics.registry.get_sample_value("sluice:compiles_total", {
                "model_name": "tiny", "reason": reason, "function": function}) >= n
        ids = tiny.tokenizer.encode("embed me")
        np.testing.assert_allclose(front.embed(ids), mean_pooled(tiny, ids),
                                   rtol=1e-5, atol=1e-6)
        assert not cluster.intake.model.loaded
        col = Collector()
        cluster.submit("r", "after warm-up", SamplingParams(max_tokens=8, **GREEDY), col.sink)
        col.wait(["r"])
        # Its outputs came with the actor's counts as of then, after the embedding.
        assert compiles.remote(name) == warm
    finally:
        cluster.shutdown()
        ray.shutdown()
