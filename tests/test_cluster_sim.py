"""The cluster simulator of `bench/cluster_sim.py` (issue 7): under bursty
overload with live migration, every request finishes and every block reserved
for a migration comes back, whichever way the migration ends."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from sluice.scheduler.cluster import ClusterConfig


@pytest.fixture(scope="module")
def sim():
    path = Path(__file__).parents[1] / "bench" / "cluster_sim.py"
    spec = importlib.util.spec_from_file_location("bench_cluster_sim", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


INSTANCE = {"pool_blocks": 96, "block_size": 16, "max_num_seqs": 8, "budget": 128}
MIGRATION = {"downtime_s": 0.0016, "copy_s": lambda blocks: 0.0015 + 2.4e-5 * blocks}
CONFIGS = {
    "round-robin": ClusterConfig(dispatch="round-robin", migrate=False),
    "freest": ClusterConfig(dispatch="freest", migrate=False),
    "sluice": ClusterConfig(dispatch="freest", migrate=True, migration_choice="last",
                            interval_s=0.05, migrate_below=3.0, migrate_above=8.0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_overloaded_cluster_finishes_everything_and_returns_every_block(sim, name):
    step = sim.StepModel(0.006, 1.5e-4, 2.7e-6)
    trace, _ = sim.burstgpt_like_trace(16, 12, 3 * 5000.0, 4.0, 1024, seed=0)
    simulator = sim.Simulator(CONFIGS[name], 16, INSTANCE, step, MIGRATION)
    result = simulator.run(trace)  # raises if it stalls or ends holding blocks
    assert result["requests"] == len(trace)
    assert all(r.finished is not None for r in trace)
    assert all(i.free == i.num_blocks and not i.running and not i.waiting
               for i in simulator.instances)
    if CONFIGS[name].migrate:
        assert simulator.migrations > 0
