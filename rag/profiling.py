"""Offline profiles: each candidate configuration run over a question set with labels.

``measure(pipeline, config, questions, rivals=())`` runs the questions through ``config`` one
at a time (no queueing, so latencies are service times) and returns a ``Measurement``:
per-query latency, cost, exact match and F1 against the labels, plus the ``Profile`` the
planner uses (quality = mean F1, latency p95, mean cost). The labels are the corpus's own
(SQuAD) or generated from its passages (``sluice.rag.synthetic``); ``method`` names which.

Early stop: after ``MIN_QUESTIONS`` questions a configuration is dropped as clearly
dominated when a rival measured in this run on the same questions has p95 latency at most
this one's mean latency so far, cost at most its mean cost, and F1 at least as high: the
per-question differences (rival minus this one, paired, so the questions' own difficulty
cancels) have a mean at least ``BOUND_Z`` standard errors above zero, or are all zero.
More questions would not lift it onto the Pareto front. Its profile is kept, marked
``stopped_early``, with quality = the rival's quality less that mean difference (a paired
estimate: the first questions may be easier or harder than the rest), at least 0.

``measure_all(pipeline, configs, questions, store)`` measures every configuration not
already in the ``ProfileStore``, after ``warm_up`` (the embedder's shapes a query uses:
up to ``WARM_LENGTH`` tokens) and one warm-up query each (which compiles what is left), so
one-off JIT compilation is not billed to measured queries, with a
progress bar (stderr) and the store written after each configuration: an interrupted build
keeps what it measured and a re-run measures only the rest. The store keeps profiles only
for one ``digest`` of the question set and index; another digest starts afresh.

``default_configs(generative_tiers)`` is the candidate set the planner chooses from: the
extractive pipelines over every retriever, k in (1, 3, 5), with and without reranking, one or
three agents (three agents vote), and, per generative tier, one-agent and three-agent
pipelines over dense retrieval. ``sample_questions(questions, n)`` takes ``n`` spread evenly
in id order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sluice.rag.config import EXTRACTIVE, PipelineConfig
from sluice.rag.corpus import LabelledQuestion
from sluice.rag.embedder import MIN_BUCKET, Embedder
from sluice.rag.pipeline import RagPipeline
from sluice.rag.sla import Profile, load_profiles, save_profiles
from sluice.rag.text import exact_match, f1

MIN_QUESTIONS = 6
WARM_LENGTH = 64  # questions, spans and judge statements fit; passages were embedded at build
BOUND_Z = 2.0
STATE_FILE = "profiling.json"


@dataclass(frozen=True)
class Measurement:
    profile: Profile
    latencies_s: tuple[float, ...]
    costs_usd: tuple[float, ...]
    exact_match: float
    f1: float
    f1s: tuple[float, ...] = ()  # per question, in order


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


def sample_questions(questions: Sequence[LabelledQuestion], n: int) -> list[LabelledQuestion]:
    """``n`` questions spread evenly over ``questions`` in id order."""
    if n < 1:
        raise ValueError(f"--profile-questions: must be >= 1, got {n}")
    ordered = sorted(questions, key=lambda q: q.id)
    return ordered[::max(1, len(ordered) // n)][:n]


def _dominated(rivals: Sequence[Measurement], f1s: list[float], latencies: list[float],
               costs: list[float]) -> tuple[Measurement, float] | None:
    """The first rival that clearly dominates, with the mean paired F1 difference (rival
    minus this one) on the questions so far; None when none does."""
    n = len(f1s)
    mean_latency, mean_cost = float(np.mean(latencies)), float(np.mean(costs))
    for r in rivals:
        if (len(r.f1s) < n or r.profile.latency_p95_s > mean_latency
                or r.profile.cost_usd > mean_cost * (1 + 1e-9)):  # float sums of equal costs
            continue
        diff = np.asarray(r.f1s[:n]) - np.asarray(f1s)
        if diff.mean() >= BOUND_Z * diff.std(ddof=1) / math.sqrt(n):
            return r, float(diff.mean())
    return None


def measure(pipeline: RagPipeline, config: PipelineConfig,
            questions: Sequence[LabelledQuestion], rivals: Sequence[Measurement] = (),
            method: str = "labelled", progress: tqdm | None = None) -> Measurement:
    if not questions:
        raise ValueError("questions: the labelled set is empty")
    latencies, costs, ems, f1s = [], [], [], []
    dominated = None
    for q in questions:
        result = pipeline.run_sync(q.question, config)
        latencies.append(result.latency_s)
        costs.append(result.cost_usd)
        ems.append(exact_match(result.answer, q.answers))
        f1s.append(f1(result.answer, q.answers))
        if progress is not None:
            progress.update()
        if MIN_QUESTIONS <= len(f1s) < len(questions) and rivals:
            dominated = _dominated(rivals, f1s, latencies, costs)
            if dominated:
                if progress is not None:
                    progress.update(len(questions) - len(f1s))
                break
    # Stopped early, the questions so far may be easier or harder than the rest: its quality
    # is the rival's (measured on all of them) less the paired difference seen so far, at
    # least 0 (a rival far ahead on the first questions would otherwise push it below 0).
    quality = (max(0.0, dominated[0].profile.quality - dominated[1]) if dominated
               else float(np.mean(f1s)))
    profile = Profile(config, quality, float(np.percentile(latencies, 95)),
                      float(np.mean(costs)), float(np.mean(latencies)), float(np.mean(ems)),
                      len(f1s), method, len(f1s) < len(questions))
    return Measurement(profile, tuple(latencies), tuple(costs), float(np.mean(ems)),
                       float(np.mean(f1s)), tuple(f1s))


class ProfileStore:
    """``profiles.json`` of an index directory, with the digest of what was measured in
    ``profiling.json``; ``add`` writes both at once (atomically)."""

    def __init__(self, directory: str | Path, digest: str, profiles_file: str):
        self.directory = Path(directory)
        self.path = self.directory / profiles_file
        self.digest = digest
        self.profiles: list[Profile] = []
        state = self.directory / STATE_FILE
        if self.path.exists() and state.exists():
            try:
                same = json.loads(state.read_text()).get("digest") == digest
            except (OSError, json.JSONDecodeError):
                same = False
            if same:
                self.profiles = load_profiles(self.path)

    def done(self, config: PipelineConfig) -> bool:
        return any(p.config == config for p in self.profiles)

    def add(self, profile: Profile) -> None:
        self.profiles.append(profile)
        (self.directory / STATE_FILE).write_text(json.dumps({"digest": self.digest}))
        save_profiles(self.path, self.profiles)


def measure_all(pipeline: RagPipeline, configs: Sequence[PipelineConfig],
                questions: Sequence[LabelledQuestion], store: ProfileStore | None = None,
                method: str = "labelled", progress: bool = False,
                early_stop: bool = True) -> list[Measurement]:
    """Measurements of the configurations not yet in ``store`` (all without one); every new
    profile is added to ``store`` as soon as it is measured. ``early_stop=False`` measures
    every configuration on every question (the benchmark's comparisons)."""
    todo = [c for c in configs if store is None or not store.done(c)]
    bar = tqdm(total=len(todo) * len(questions), desc="profiling", unit="query",
               disable=not progress)
    out: list[Measurement] = []
    if todo:
        warm_up(pipeline.embedder, WARM_LENGTH)
    try:
        for config in todo:
            bar.set_postfix_str(config.name)
            pipeline.run_sync(questions[0].question, config)  # warm-up: compile new shapes
            m = measure(pipeline, config, questions, out if early_stop else (), method, bar)
            out.append(m)
            if store is not None:
                store.add(m.profile)
    finally:
        bar.close()
    return out


def warm_up(embedder: Embedder, max_length: int | None = None) -> None:
    """Compile every padded shape the embedder can use (power-of-two rows and lengths, up to
    ``max_length`` tokens: default the embedder's), so measured latencies are service times,
    not first-use JIT compilation."""
    rows = 1
    while rows <= embedder.batch_size:
        length = MIN_BUCKET
        while length <= min(max_length or embedder.max_length, embedder.max_length):
            embedder.embed(["word " * (length - 2)] * rows)
            length *= 2
        rows *= 2
