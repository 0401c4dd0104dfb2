"""Hybrid retrieval: reciprocal-rank fusion (RRF) of several retrievers' rankings.

``reciprocal_rank_fusion(rankings, c=60)`` scores each passage by the sum over rankings of
``1 / (c + rank)`` (rank 1-based; a ranking that lacks the passage adds nothing) and returns
``Hit``s best first, ties broken by the passage's best rank in any ranking, then by the order
in which rankings list it. RRF uses ranks only, so BM25 scores and cosine similarities, which
live on unrelated scales, need no calibration; ``c = 60`` is the value of Cormack, Clarke and
Buettcher (SIGIR 2009), which damps the weight of any single top rank.

``HybridRetriever(retrievers, depth=50, c=60)`` asks every retriever for its top ``depth``
(at least ``k``) and fuses them; it satisfies the ``Retriever`` protocol.
"""

from __future__ import annotations

from collections.abc import Sequence

from sluice.rag.retrieval import Hit, Retriever, check_k

RRF_C = 60


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Hit]], c: int = RRF_C) -> list[Hit]:
    if c < 0:
        raise ValueError(f"c: must be non-negative, got {c}")
    scores: dict[str, float] = {}
    best_rank: dict[str, int] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            scores[hit.passage_id] = scores.get(hit.passage_id, 0.0) + 1.0 / (c + rank)
            best_rank[hit.passage_id] = min(best_rank.get(hit.passage_id, rank), rank)
    first_seen = {pid: n for n, pid in enumerate(scores)}
    order = sorted(scores, key=lambda pid: (-scores[pid], best_rank[pid], first_seen[pid]))
    return [Hit(pid, scores[pid]) for pid in order]


class HybridRetriever:
    def __init__(self, retrievers: Sequence[Retriever], depth: int = 50, c: int = RRF_C):
        if not retrievers:
            raise ValueError("retrievers: at least one is required")
        check_k(depth, depth)
        self.retrievers, self.depth, self.c = list(retrievers), depth, c

    def search(self, question: str, k: int) -> list[Hit]:
        return self.search_many([question], k)[0]

    def search_many(self, questions: Sequence[str], k: int) -> list[list[Hit]]:
        check_k(k, k)
        depth = max(k, self.depth)
        per_retriever = [r.search_many(questions, depth) for r in self.retrievers]
        return [reciprocal_rank_fusion([hits[i] for hits in per_retriever], self.c)[:k]
                for i in range(len(questions))]
