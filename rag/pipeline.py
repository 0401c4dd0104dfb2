"""One query through one ``PipelineConfig``: rewrite -> retrieve -> rerank -> answer -> arbitrate.

``RagPipeline(index, cost_model, generators)`` holds what every query shares: the retrieval
index (whose dense retriever carries the embedder), the ``CostModel`` and one ``Generator``
per generative tier. ``await run(question, config)`` returns a ``RagResult``:

- ``answer``: the arbitrated answer text;
- ``passage_ids``: the cited passages, the winning answer's passage first, then the rest of
  the context in rank order;
- ``citations``: the passages the winning answer rests on (``passage_id``, ``title``,
  ``text``: the sentence an extractive answer came from, or the passage a generative answer
  cited as ``[n]``);
- ``warnings``: e.g. that a question longer than the embedder's token limit was cut to it
  (``limit``), which is not an error;
- ``config``: the configuration that ran;
- ``latency_s``: wall time of the whole run (``time.perf_counter``);
- ``cost_usd``: ``CostModel.usd`` summed over the tiers' metered tokens; ``tokens``:
  ``{tier: [prompt, completion]}``.

Extractive agents share one embedding pass; generative agents of one tier go to their
generator as one batch; the tiers run concurrently (``asyncio.gather``), so adding agents
adds cost but little latency. Blocking work (retrieval, embedding) runs on worker threads,
so a pipeline inside the HTTP server never stalls the event loop. ``run_sync`` wraps ``run``
for scripts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

from sluice.rag.agents import (Candidate, EmbeddingCache, ExtractiveAnswerer,
                               GenerativeAnswerer, Meter, arbitrate, rerank, rewrite_query)
from sluice.rag.config import EXTRACTIVE, PipelineConfig
from sluice.rag.cost import CostModel
from sluice.rag.generation import Generator
from sluice.rag.index import RetrievalIndex
from sluice.rag.retrieval import check_question


@dataclass(frozen=True)
class RagResult:
    answer: str
    passage_ids: tuple[str, ...]
    config: PipelineConfig
    latency_s: float
    cost_usd: float
    tokens: dict[str, list[int]]
    citations: tuple[dict[str, str], ...] = ()
    warnings: tuple[str, ...] = ()


class RagPipeline:
    def __init__(self, index: RetrievalIndex, cost_model: CostModel,
                 generators: Mapping[str, Generator] | None = None):
        self.index = index
        self.embedder = index.dense.embedder
        self.cost_model = cost_model
        self.generators = dict(generators or {})
        self.extractive = ExtractiveAnswerer()
        self._passages = {p.id: p for p in index.corpus.passages}

    def check(self, config: PipelineConfig) -> None:
        """``ValueError`` when a tier of ``config`` has no generator or no price."""
        for tier in config.agents:
            if tier != EXTRACTIVE and tier not in self.generators:
                raise ValueError(f"agents: tier {tier!r} is not served here (served: "
                                 f"{', '.join([EXTRACTIVE, *sorted(self.generators)])})")
            if tier not in self.cost_model.rates:
                raise ValueError(f"agents: tier {tier!r} has no price in the cost model")

    async def run(self, question: str, config: PipelineConfig) -> RagResult:
        question = check_question(question)
        self.check(config)
        start = time.perf_counter()
        question, warnings = self.limit(question)
        meter = Meter()
        cache = EmbeddingCache(self.embedder, meter, self.index.sentence_vectors)
        query = rewrite_query(question)
        hits = await asyncio.to_thread(self.index.retriever(config.retriever).search, query,
                                       config.k)
        if config.retriever != "bm25":
            meter.add(EXTRACTIVE, len(self.embedder.tokenize([query])[0]))
        passages = [self._passages[h.passage_id] for h in hits]
        if not passages:  # BM25 finds nothing when no question term is in the corpus
            passages = [self._passages[h.passage_id]
                        for h in await asyncio.to_thread(self.index.dense.search, query,
                                                         config.k)]
        if config.rerank:
            passages = await asyncio.to_thread(rerank, question, passages, cache)
        candidates = await self._answer(question, passages, config, meter, cache)
        winner = await asyncio.to_thread(arbitrate, config.arbitration, question, candidates,
                                         cache)
        cited = [winner.passage_id] + [p.id for p in passages if p.id != winner.passage_id]
        latency = time.perf_counter() - start
        tokens = {tier: list(counts) for tier, counts in meter.tokens.items()}
        cost = sum(self.cost_model.usd(tier, p, c) for tier, (p, c) in tokens.items())
        return RagResult(winner.text, tuple(cited), config, latency, cost, tokens,
                         self._citations(winner), warnings)

    def limit(self, question: str) -> tuple[str, tuple[str, ...]]:
        """The question cut to the embedder's token limit, and a warning when it was cut."""
        cut, tokens = self.embedder.truncate(question)
        if cut == question:
            return question, ()
        return cut, (f"question: {tokens} tokens is longer than the embedder's limit of "
                     f"{self.embedder.max_length}; only its first {len(cut)} characters were "
                     "used",)

    def _citations(self, winner: Candidate) -> tuple[dict[str, str], ...]:
        out = []
        for pid in winner.cited or (winner.passage_id,):
            passage = self._passages[pid]
            evidence = winner.evidence if winner.tier == EXTRACTIVE else passage.text
            out.append({"passage_id": pid, "title": passage.title, "text": evidence})
        return tuple(out)

    async def _answer(self, question: str, passages: list, config: PipelineConfig,
                      meter: Meter, cache: EmbeddingCache) -> list[Candidate]:
        by_tier: dict[str, list[int]] = {}
        for agent, tier in enumerate(config.agents):
            by_tier.setdefault(tier, []).append(agent)
        jobs = []
        for tier, agent_ids in by_tier.items():
            if tier == EXTRACTIVE:
                jobs.append(asyncio.to_thread(self.extractive.answer, question, passages,
                                              len(agent_ids), cache))
            else:
                jobs.append(GenerativeAnswerer(self.generators[tier], tier).answer(
                    question, passages, agent_ids, config.max_tokens, meter))
        return [c for group in await asyncio.gather(*jobs) for c in group]

    def run_sync(self, question: str, config: PipelineConfig) -> RagResult:
        return asyncio.run(self.run(question, config))
