"""Instances as Ray actors (a local Ray cluster): dispatch, live migration across
processes, and recovery from a crashed actor, all token-identical to one engine;
the actors share a compilation cache, and the driver holds no weights until an
embedding needs them."""

from __future__ import annotations

import numpy as np
import pytest
import ray

from sluice.runtime import SamplingParams
from sluice.runtime.embed import mean_pooled
from sluice.runtime.engine import EngineConfig
from sluice.scheduler.cluster import ClusterConfig
from sluice.scheduler.migration import migrate
from sluice.scheduler.ray_instance import ModelSpec, ray_cluster
from test_cluster import ENGINE, GREEDY, Collector, free_blocks_restored, reference


def test_weight_free_model_prepares_requests_and_loads_its_weights_on_first_use(
        tiny, monkeypatch):
    """``load_model(weights=False)`` (the Ray driver's): an intake tokenizes and
    validates with it without building parameters; the first ``params`` access
    builds them once, equal to a full load's."""
    from sluice.runtime import loader
    from sluice.runtime.engine import make_intake

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


def _cache_dir(actor) -> str:
    """The persistent compilation cache directory JAX uses in ``actor``'s process."""
    return ray.get(actor.__ray_call__.remote(
        lambda self: __import__("jax").config.jax_compilation_cache_dir))


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
        # actors use the compilation cache the driver chose, and wrote to it.
        assert not cluster.intake.model.loaded
        assert [_cache_dir(i.actor) for i in cluster.instances.values()] == [str(cache)] * 2
        assert any(cache.iterdir())
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
        # An embedding (the server's /v1/embeddings runs in the driver) loads the
        # driver's weights on first use: the same vectors as the full model's.
        assert not cluster.intake.model.loaded
        ids = cluster.intake.model.tokenizer.encode("embed me")
        np.testing.assert_allclose(mean_pooled(cluster.intake.model, ids),
                                   mean_pooled(tiny, ids), rtol=1e-6)
        assert cluster.intake.model.loaded
    finally:
        cluster.shutdown()
        ray.shutdown()
