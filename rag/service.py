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
the class needs to keep its latency SLO at that rate with that configuration, and whether
any configuration meets the class's SLO (``slo_feasible``; if not, ``slo_unmet`` says
why): what ``GET /v1/rag/status`` reports, for an operator or an autoscaler to act on
(this process does not start replicas itself).

It returns a ``RagAnswer``: the pipeline's ``RagResult`` (answer, cited passage ids and
citations, configuration, warnings, latency, cost, tokens), the class and, when no measured
configuration meets the class's SLO, why (the class is then served best-effort:
``best_effort: true`` and ``slo_unmet`` in the body); ``to_dict`` is the HTTP response body.

``RagService.load(index_dir, generators, tiers)`` reads what ``sluice rag build-index``
wrote: the retrieval index, ``profiles.json`` (measured configuration profiles) and
``classes.json`` (query classes, their SLOs and optional seed questions; when absent,
``derive_classes(profiles)``: the built-in classes with SLOs derived from the measured
profiles; a class without seeds must be one of the built-in ones; a file that does not
parse is a ``ValueError`` naming the class and the field). Profiles of
configurations whose tiers are not served by this process are left out, so a server started
without a generative model still plans over the extractive ones.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
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
HEADROOM = 2.0        # derived latency bounds: this many times the measured p95
QUALITY_SHARE = 0.9   # derived quality floors: this share of the quality measured there
# The built-in classes; their fixed SLOs are the issue-9 benchmark's reference targets.
# An index's classes.json gets SLOs measured on its own hardware (``derive_classes``).
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
    slo_unmet: str | None = None  # the class's SLO is met by no configuration: best effort

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        return {"object": "rag.answer", "answer": r.answer,
                "passage_ids": list(r.passage_ids), "citations": list(r.citations),
                "class": self.query_class,
                "configuration": {"name": r.config.name, **r.config.to_dict()},
                "best_effort": self.slo_unmet is not None, "slo_unmet": self.slo_unmet,
                "warnings": list(r.warnings), "latency_s": r.latency_s, "cost_usd": r.cost_usd,
                "usage": {tier: {"prompt_tokens": p, "completion_tokens": c}
                          for tier, (p, c) in r.tokens.items()}}


def derive_classes(profiles: Sequence[Profile]) -> dict[str, QueryClass]:
    """``DEFAULT_CLASSES`` with SLOs that fit the measured hardware: ``lookup`` within
    ``HEADROOM`` x the fastest configuration's p95 and ``QUALITY_SHARE`` of the best quality
    reachable there; ``analytical`` within ``HEADROOM`` x the p95 of the best-quality
    configuration and ``QUALITY_SHARE`` of that quality. No cost bound (the planner already
    picks the cheapest configuration that meets the rest). Both are met by construction."""
    if not profiles:
        raise ValueError("profiles: none measured, so no SLO can be derived")
    fast_bound = HEADROOM * min(p.latency_p95_s for p in profiles)
    fast_quality = max(p.quality for p in profiles if p.latency_p95_s <= fast_bound)
    best = max(profiles, key=lambda p: (p.quality, -p.latency_p95_s))
    slos = {"lookup": SLO(round(QUALITY_SHARE * fast_quality, 3), _round_up(fast_bound)),
            "analytical": SLO(round(QUALITY_SHARE * best.quality, 3),
                              _round_up(HEADROOM * best.latency_p95_s))}
    return {name: replace(DEFAULT_CLASSES[name], slo=slo) for name, slo in slos.items()}


def _round_up(seconds: float) -> float:
    """Two significant digits, rounded up, so the bound stays above what was measured."""
    scale = 10 ** (math.floor(math.log10(seconds)) - 1)
    return math.ceil(seconds / scale) * scale


def save_classes(path: str | Path, classes: Mapping[str, QueryClass]) -> None:
    Path(path).write_text(json.dumps(
        {name: {"slo": c.slo.to_dict(), "description": c.description, "seeds": list(c.seeds)}
         for name, c in classes.items()}, indent=1))


def load_classes(path: str | Path) -> dict[str, QueryClass]:
    """The classes of ``classes.json``; ``ValueError`` naming the file, the class and the
    field when it does not parse."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the query classes ({e})") from e
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: must be a non-empty object of class name -> "
                         "{\"slo\": {...}, \"description\": str, \"seeds\": [str]}")
    return {name: _parse_class(path, name, row) for name, row in raw.items()}


def _parse_class(path: str | Path, name: str, row: Any) -> QueryClass:
    where = f"{path}: class {name!r}"
    if not isinstance(row, dict) or not isinstance(row.get("slo"), dict):
        raise ValueError(f"{where}: field 'slo' must be an object of "
                         f"min_quality, latency_p95_s, max_cost")
    unknown = set(row) - {"slo", "description", "seeds"}
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
    try:
        slo = SLO.from_dict({k: v for k, v in row["slo"].items() if v is not None})
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    description = row.get("description", "")
    if not isinstance(description, str):
        raise ValueError(f"{where}: field 'description' must be a string")
    seeds = row.get("seeds", [])
    if not isinstance(seeds, list) or not all(isinstance(x, str) and x.strip() for x in seeds):
        raise ValueError(f"{where}: field 'seeds' must be a list of non-empty strings")
    if not seeds and name not in DEFAULT_SEEDS:
        raise ValueError(f"{where}: field 'seeds' must give example questions for a class "
                         f"that is not built in ({', '.join(DEFAULT_SEEDS)})")
    return QueryClass(name, slo, description, tuple(seeds))


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
        profiles = load_profiles(index_dir / PROFILES_FILE)
        classes_path = index_dir / CLASSES_FILE
        classes = (load_classes(classes_path) if classes_path.exists()
                   else derive_classes(profiles))
        seeds = {name: c.seeds or DEFAULT_SEEDS.get(name, ()) for name, c in classes.items()}
        rules = [(pattern, c) for pattern, c in DEFAULT_RULES if c in classes]
        classifier = IntentClassifier(embedder, seeds, rules)
        return cls(pipeline, classifier, classes, profiles)

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
        return RagAnswer(result, query_class,
                         self.orchestrator.unmet(query_class) if orchestrated else None)

    def status(self) -> dict[str, dict[str, Any]]:
        now = self.clock()
        out = {}
        for name in self.classes:
            profile = self.orchestrator.profile_for(name)
            unmet = self.orchestrator.unmet(name)
            out[name] = {"config": profile.config.name,
                         "arrival_rate_qps": self.capacity.rate(name, now),
                         "replicas_wanted": self.capacity.current(name),
                         "slo": self.classes[name].slo.to_dict(),
                         "slo_feasible": unmet is None, "slo_unmet": unmet}
        return out
