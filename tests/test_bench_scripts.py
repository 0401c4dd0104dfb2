"""The benchmark scripts' hooks into the engine keep working as the engine
changes: they wrap ``ModelRunner.execute`` and must pass all its arguments on."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from sluice.runtime import LLM, SamplingParams, load_model
from sluice.runtime.engine import EngineConfig, LLMEngine


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", Path(__file__).parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("swap", [False, True])
def test_cluster_step_recorder_records_every_step(swap):
    """With a swap space, ``low`` is displaced and swapped back in while
    ``long`` runs: the engine passes ``during`` (asynchronous swap-in)."""
    cluster = _bench("cluster")
    kw = dict(swap_space=64 * 32 * 1024, preemption_mode="swap") if swap else {}
    engine = LLMEngine(load_model("tiny"), EngineConfig(
        warmup=False, max_model_len=128, max_num_seqs=2, scheduling_policy="priority", **kw))
    recorder = cluster.StepRecorder()
    recorder.attach(engine)
    recorder.enabled = True
    steps = 0
    for rid, prompt, n, priority in (("long", [5] * 20, 40, 0), ("low", [9] * 30, 30, 5),
                                     ("urgent", [3] * 20, 4, 0)):
        engine.add_request(rid, {"prompt_token_ids": prompt},
                           SamplingParams(max_tokens=n, temperature=0.0), priority=priority)
        for _ in range(3):
            engine.step()
            steps += 1
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    assert len(recorder.samples) == steps
    if swap:
        assert engine.swapper.stats.num_swap_ins == 1


def test_throughput_decode_timer_times_the_steps():
    throughput = _bench("throughput")
    llm = LLM("tiny", max_model_len=128, warmup=False)
    result = throughput.decode_steps(llm, [[1, 2, 3]] * 2, 4)
    assert result["num_steps"] == 4 and result["num_full_decode_steps"] == 3


def test_rag_rank_agreement_with_retriever_offsets_matched():
    """The documents run's diagnostic: an estimate that is the labelled quality plus a
    per-retriever offset ranks perfectly once the offsets are matched, not before."""
    rag = _bench("rag")
    configs = rag.default_configs()
    order = np.random.default_rng(0).permutation(len(configs))
    labelled = {c.name: 0.3 + 0.005 * int(i) for c, i in zip(configs, order)}  # no ties
    offset = {"bm25": 0.05, "dense": -0.04, "hybrid": 0.0}
    unlabelled = {c.name: labelled[c.name] + offset[c.retriever] for c in configs}
    assert rag.rho(unlabelled, labelled) < 0.9
    assert rag.rho_retriever_matched(unlabelled, labelled, configs) == pytest.approx(1.0)
    # Offsets matched, what is left is the order within each retriever: reversed there,
    # the agreement must fall below what the offsets alone cost.
    reversed_within = {}
    for retriever in offset:
        names = [c.name for c in configs if c.retriever == retriever]
        values = sorted(unlabelled[n] for n in names)
        ranked = sorted(names, key=labelled.get)
        reversed_within.update(zip(ranked, reversed(values)))
    assert rag.rho_retriever_matched(reversed_within, labelled, configs) < 0
