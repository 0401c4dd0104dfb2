"""Offline profiles: each candidate configuration run over a labelled question set.

``measure(pipeline, config, questions)`` runs every question through ``config`` one at a
time (no queueing, so latencies are service times) and returns a ``Measurement``: per-query
latency, cost, exact match and F1 against the gold answers, plus the ``Profile`` the planner
uses (quality = mean F1, latency p95, mean cost). ``measure_all`` does that for a list of
configurations after one warm-up query per configuration, and ``warm_up(embedder)`` compiles
every embedding shape first, so one-off JIT compilation is not billed to measured queries.

``default_configs(generative_tiers)`` is the candidate set the planner chooses from: the
extractive pipelines over every retriever, k in (1, 3, 5), with and without reranking, one or
three agents (three agents vote), and, per generative tier, one-agent and three-agent
pipelines over dense retrieval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sluice.rag.config import EXTRACTIVE, PipelineConfig
from sluice.rag.corpus import LabelledQuestion
from sluice.rag.embedder import MIN_BUCKET, Embedder
from sluice.rag.pipeline import RagPipeline
from sluice.rag.sla import Profile
from sluice.rag.text import exact_match, f1


@dataclass(frozen=True)
class Measurement:
    profile: Profile
    latencies_s: tuple[float, ...]
    costs_usd: tuple[float, ...]
    exact_match: float
    f1: float


def default_configs(generative_tiers: Sequence[str] = ()) -> list[PipelineConfig]:
    configs = [PipelineConfig(retriever, k, rerank, (EXTRACTIVE,) * agents,
                              arbitration="vote" if agents > 1 else "best")
               for retriever in ("bm25", "dense", "hybrid")
               for k in (1, 3, 5)
               for rerank in (False, True) if not (rerank and k == 1)
               for agents in (1, 3) if not (agents > 1 and k == 1)]
    for tier in generative_tiers:
        configs.append(PipelineConfig("dense", 3, False, (tier,), max_tokens=16))
        configs.append(PipelineConfig("dense", 3, False, (EXTRACTIVE, tier, tier),
                                      max_tokens=16, arbitration="judge"))
    return configs


def measure(pipeline: RagPipeline, config: PipelineConfig,
            questions: Sequence[LabelledQuestion]) -> Measurement:
    if not questions:
        raise ValueError("questions: the labelled set is empty")
    latencies, costs, ems, f1s = [], [], [], []
    for q in questions:
        result = pipeline.run_sync(q.question, config)
        latencies.append(result.latency_s)
        costs.append(result.cost_usd)
        ems.append(exact_match(result.answer, q.answers))
        f1s.append(f1(result.answer, q.answers))
    profile = Profile(config, float(np.mean(f1s)), float(np.percentile(latencies, 95)),
                      float(np.mean(costs)), float(np.mean(latencies)))
    return Measurement(profile, tuple(latencies), tuple(costs), float(np.mean(ems)),
                       float(np.mean(f1s)))


def measure_all(pipeline: RagPipeline, configs: Sequence[PipelineConfig],
                questions: Sequence[LabelledQuestion]) -> list[Measurement]:
    warm_up(pipeline.embedder)
    out = []
    for config in configs:
        pipeline.run_sync(questions[0].question, config)  # warm-up: compile new shapes
        out.append(measure(pipeline, config, questions))
    return out


def warm_up(embedder: Embedder) -> None:
    """Compile every padded shape the embedder can use (power-of-two rows and lengths), so
    measured latencies are service times, not first-use JIT compilation."""
    rows = 1
    while rows <= embedder.batch_size:
        length = MIN_BUCKET
        while length <= embedder.max_length:
            embedder.embed(["word " * (length - 2)] * rows)
            length *= 2
        rows *= 2
