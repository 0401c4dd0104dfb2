"""The retriever interface shared by BM25, dense and hybrid retrieval, and its evaluation.

- ``Hit(passage_id, score)``: one retrieved passage; a higher score is better, and scores are
  only comparable within one retriever.
- ``Retriever``: anything with ``search(question, k) -> list[Hit]`` (best first, at most
  ``k``) and ``search_many(questions, k) -> list[list[Hit]]``. Agents and the planner depend
  on this protocol only, so retrievers are interchangeable configuration knobs.
- ``check_question(question)`` / ``check_k(k, size)``: the shared input validation; they raise
  ``ValueError`` naming the field.
- ``CorpusRetriever``: the base of retrievers over one indexed corpus (BM25, dense): it
  validates the input and leaves the ranking (``_rank``) to the subclass.
- ``evaluate(retriever, questions, ks)``: recall@k for each ``k``, the fraction of
  labelled questions whose answer passage is among the top ``k`` hits, and the MRR over the
  top ``max(ks)``, for tests and ``bench/rag.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sluice.rag.corpus import LabelledQuestion


@dataclass(frozen=True)
class Hit:
    passage_id: str
    score: float


class Retriever(Protocol):
    def search(self, question: str, k: int) -> list[Hit]: ...

    def search_many(self, questions: Sequence[str], k: int) -> list[list[Hit]]: ...


def check_question(question: str) -> str:
    """The stripped question; ``ValueError`` naming the field when it is empty."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question: must be a non-empty string")
    return question.strip()


def check_k(k: int, size: int) -> int:
    """``k`` capped at the corpus ``size``; ``ValueError`` when it is not a positive int."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: must be a positive integer, got {k!r}")
    return min(k, size)


class CorpusRetriever:
    """``search``/``search_many`` over the passages ``_ids`` (set by the subclass):
    the questions and ``k`` are validated here, ``_rank`` ranks valid ones."""

    _ids: list[str]

    def search(self, question: str, k: int) -> list[Hit]:
        return self.search_many([question], k)[0]

    def search_many(self, questions: Sequence[str], k: int) -> list[list[Hit]]:
        k = check_k(k, len(self._ids))
        queries = [check_question(q) for q in questions]
        return self._rank(queries, k) if queries else []

    def _rank(self, queries: list[str], k: int) -> list[list[Hit]]:
        """Hits for each query, best first, at most ``k`` (1 <= k <= corpus size)."""
        raise NotImplementedError


def rank_of_answer(hits: Sequence[Hit], passage_id: str) -> int | None:
    """1-based rank of ``passage_id`` in ``hits``, or None when it was not retrieved."""
    for rank, hit in enumerate(hits, start=1):
        if hit.passage_id == passage_id:
            return rank
    return None


def evaluate(retriever: Retriever, questions: Sequence[LabelledQuestion],
             ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``{"recall@k": ..., "mrr": ...}`` over ``questions`` (MRR counts the top ``max(ks)``)."""
    if not questions:
        raise ValueError("questions: the labelled set is empty")
    results = retriever.search_many([q.question for q in questions], max(ks))
    ranks = [rank_of_answer(hits, q.passage_id) for hits, q in zip(results, questions)]
    metrics = {f"recall@{k}": sum(r is not None and r <= k for r in ranks) / len(ranks)
               for k in ks}
    metrics["mrr"] = sum(1.0 / r for r in ranks if r is not None) / len(ranks)
    return metrics
