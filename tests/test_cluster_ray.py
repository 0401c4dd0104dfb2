"""Instances as Ray actors (a local Ray cluster): dispatch, live migration across
processes, and recovery from a crashed actor, all token-identical to one engine."""

from __future__ import annotations

import pytest
import ray

from sluice.runtime import SamplingParams
from sluice.runtime.engine import EngineConfig
from sluice.scheduler.cluster import ClusterConfig
from sluice.scheduler.migration import migrate
from sluice.scheduler.ray_instance import ModelSpec, ray_cluster
from test_cluster import ENGINE, GREEDY, Collector, free_blocks_restored, reference


@pytest.mark.slow
def test_ray_instances_migrate_and_survive_a_crash():
    config = EngineConfig(**ENGINE)
    cluster = ray_cluster(ModelSpec("tiny", "float32"), config, 2,
                          ClusterConfig(dispatch="round-robin", migrate=False))
    col = Collector()
    jobs = [(f"r{i}", f"ray instance {i}", SamplingParams(max_tokens=480, **GREEDY))
            for i in range(3)]
    try:
        want = reference(cluster.intake.model, jobs)
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
                want.update(reference(cluster.intake.model, [jobs[-1]]))
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
    finally:
        cluster.shutdown()
        ray.shutdown()
