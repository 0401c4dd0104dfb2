"""``RagService``: the Python API of the RAG layer, and what ``POST /v1/rag/query`` calls.

``await service.query(question, query_class=None, slo=None)``:

1. the question must be a non-empty string (``ValueError("question: ...")``);
2. the class is ``query_class`` if given (``ValueError("class: unknown ...")`` names the known
   ones) or the ``IntentClassifier``'s pick;
3. with an ``slo`` (an ``SLO`` or its dict form; missing fields come from the class's SLO)
   the planner chooses the cheapest configuration meeting it, or raises ``ValueError``
   saying what is achievable; without one the ``ReOrchestrator`` supplies the class's current
   configuration;
4. the ``RagPipeline`` runs it; the finished query's latency and the number of queries in
   flight feed the re-orchestrator, and every query's arrival feeds `Capacity`.

``service.status()`` is, per class, the configuration the re-orchestrator runs now, the
observed arrival rate and the replicas (`sluice.rag.capacity`, re-decided at every arrival)
the class needs to keep its latency SLO at that rate with that configuration: what ``GET /v1/rag/status`` reports, for
an operator or an autoscaler to act on (this process does not start replicas itself).

It returns a ``RagAnswer``: the pipeline's ``RagResult`` (answer, cited passage ids,
configuration, latency, cost, tokens) and the class; ``to_dict`` is the HTTP response body.

``RagService.load(index_dir, generators, tiers)`` reads what ``sluice rag build-index``
wrote: the retrieval index, ``profiles.json`` (measured configuration profiles) and
``classes.json`` (query classes, their SLOs and optional seed questions; ``DEFAULT_CLASSES``
when absent; a class without seeds must be one of the built-in ones). Profiles of
configurations whose tiers are not served by this process are left out, so a server started
without a generative model still plans over the extractive ones.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sluice.rag.capacity import Capacity
from sluice.rag.config import EXTRACTIVE, PipelineConfig
from sluice.rag.cost import MINILM, CostModel, ModelTier
from sluice.rag.embedder import Embedder
from sluice.rag.generation import Generator
from sluice.rag.index import RetrievalIndex
from sluice.rag.intent import DEFAULT_RULES, DEFAULT_SEEDS, IntentClassifier
from sluice.rag.pipeline import RagPipeline, RagResult
from sluice.rag.retrieval import check_question
from sluice.rag.sla import SLO, Planner, Profile, QueryClass, ReOrchestrator, load_profiles

PROFILES_FILE = "profiles.json"
CLASSES_FILE = "classes.json"
DEFAULT_CLASSES: dict[str, QueryClass] = {
    "lookup": QueryClass("lookup", SLO(min_quality=0.2, latency_p95_s=1.0, max_cost=1e-6),
                         "a short fact: fast and cheap"),
    "analytical": QueryClass("analytical", SLO(min_quality=0.25, latency_p95_s=3.0,
                                               max_cost=1e-5),
                             "explanations and comparisons: better answers, more work"),
}


@dataclass(frozen=True)
class RagAnswer:
    """The pipeline's result and the class it was served as."""

    result: RagResult
    query_class: str

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        return {"object": "rag.answer", "answer": r.answer,
                "passage_ids": list(r.passage_ids), "class": self.query_class,
                "configuration": {"name": r.config.name, **r.config.to_dict()},
                "latency_s": r.latency_s, "cost_usd": r.cost_usd,
                "usage": {tier: {"prompt_tokens": p, "completion_tokens": c}
                          for tier, (p, c) in r.tokens.items()}}


def save_classes(path: str | Path, classes: Mapping[str, QueryClass]) -> None:
    Path(path).write_text(json.dumps(
        {name: {"slo": c.slo.to_dict(), "description": c.description, "seeds": list(c.seeds)}
         for name, c in classes.items()}, indent=1))


def load_classes(path: str | Path) -> dict[str, QueryClass]:
    try:
        raw = json.loads(Path(path).read_text())
        return {name: QueryClass(name, SLO.from_dict({k: v for k, v in row["slo"].items()
                                                      if v is not None}),
                                 row.get("description", ""), tuple(row.get("seeds", ())))
                for name, row in raw.items()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: cannot read the query classes ({e})") from e


class RagService:
    # The clock of arrival times (the capacity window); tests replace it so a slow
    # machine cannot push an arrival out of the window between two requests.
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(self, pipeline: RagPipeline, classifier: IntentClassifier,
                 classes: Mapping[str, QueryClass], profiles: list[Profile], workers: int = 1):
        missing = set(classifier.classes) - set(classes)
        if missing:
            raise ValueError(f"classes: the classifier's {sorted(missing)} have no SLOs")
        usable = []
        for p in profiles:
            try:
                pipeline.check(p.config)
            except ValueError:
                continue
            usable.append(p)
        self.pipeline, self.classifier, self.classes = pipeline, classifier, dict(classes)
        self.planner = Planner(usable)
        self.orchestrator = ReOrchestrator(self.planner, self.classes, workers=workers)
        self.capacity = Capacity({n: c.slo.latency_p95_s for n, c in self.classes.items()})
        self.in_flight = 0

    @classmethod
    def load(cls, index_dir: str | Path, generators: Mapping[str, Generator] | None = None,
             tiers: Mapping[str, ModelTier] | None = None,
             embedder: Embedder | None = None) -> RagService:
        index_dir = Path(index_dir)
        embedder = Embedder.load() if embedder is None else embedder
        index = RetrievalIndex.load(index_dir, embedder)
        cost = CostModel({EXTRACTIVE: ModelTier(EXTRACTIVE, MINILM), **(tiers or {})})
        pipeline = RagPipeline(index, cost, generators)
        classes_path = index_dir / CLASSES_FILE
        classes = load_classes(classes_path) if classes_path.exists() else DEFAULT_CLASSES
        seeds = {name: c.seeds or DEFAULT_SEEDS.get(name, ()) for name, c in classes.items()}
        rules = [(pattern, c) for pattern, c in DEFAULT_RULES if c in classes]
        classifier = IntentClassifier(embedder, seeds, rules)
        return cls(pipeline, classifier, classes, load_profiles(index_dir / PROFILES_FILE))

    def resolve(self, question: str, query_class: str | None,
                slo: SLO | Mapping[str, Any] | None) -> tuple[str, PipelineConfig, bool]:
        """(class, configuration, whether it came from the re-orchestrator)."""
        question = check_question(question)
        if query_class is None:
            query_class = self.classifier.classify(question)
        elif query_class not in self.classes:
            raise ValueError(f"class: unknown {query_class!r} "
                             f"(known: {', '.join(sorted(self.classes))})")
        if slo is None:
            self.orchestrator.update(query_class, self.in_flight)
            return query_class, self.orchestrator.config_for(query_class), True
        base = self.classes[query_class].slo
        slo = slo if isinstance(slo, SLO) else SLO.from_dict(dict(slo), base)
        return query_class, self.planner.choose(slo).config, False

    async def query(self, question: str, query_class: str | None = None,
                    slo: SLO | Mapping[str, Any] | None = None) -> RagAnswer:
        query_class, config, orchestrated = self.resolve(question, query_class, slo)
        now = self.clock()
        self.capacity.arrival(query_class, now)
        self.capacity.wanted(query_class, now, self.orchestrator.profile_for(query_class))
        self.in_flight += 1
        try:
            result = await self.pipeline.run(question, config)
        finally:
            self.in_flight -= 1
        if orchestrated:
            self.orchestrator.observe(query_class, result.latency_s, self.in_flight)
        return RagAnswer(result, query_class)

    def status(self) -> dict[str, dict[str, Any]]:
        now = self.clock()
        out = {}
        for name in self.classes:
            profile = self.orchestrator.profile_for(name)
            out[name] = {"config": profile.config.name,
                         "arrival_rate_qps": self.capacity.rate(name, now),
                         "replicas_wanted": self.capacity.current(name),
                         "slo": self.classes[name].slo.to_dict()}
        return out
