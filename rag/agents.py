"""The agents of a RAG pipeline: query rewriting, reranking, answering and arbitration.

Retrieval itself is the ``Retriever`` protocol (``sluice.rag.retrieval``). Every agent that
runs a model records its tokens on a ``Meter`` (per tier: prompt and completion tokens), from
which ``CostModel`` prices the query.

- ``rewrite_query(question)``: the retrieval query: white space collapsed and conversational
  lead-ins ("can you tell me", "please", "I want to know") dropped, since they carry no
  retrieval signal and dilute both BM25 and the question embedding.
- ``EmbeddingCache(embedder, meter)``: one query's embeddings by text; the reranker, the
  extractive answerer and the judge share it so no sentence is embedded twice, and only newly
  embedded texts are metered (tier ``"extractive"``); ``known`` vectors (the index's
  precomputed sentence vectors) are neither embedded nor metered again.
- ``rerank(question, passages, cache)``: cross-scores each passage against the question as the
  best cosine similarity of any of its sentences (a passage-level vector averages a long
  paragraph into its topic; the answer usually sits in one sentence), stable on ties.
- ``ExtractiveAnswerer(spans="phrases", lexical_weight=LEXICAL_WEIGHT)``: ranks every
  sentence of the passages by similarity to the question (minus ``RANK_PENALTY`` per
  retrieval rank, plus ``lexical_weight`` x the share of the question's content words the
  sentence contains: embeddings alone favour a sentence on the topic over the one holding
  the fact); agent ``i`` answers from the ``i``-th best sentence, so parallel agents look
  at different evidence. Within the sentence it scores each candidate, whole phrases
  (``candidate_phrases``) or, with ``spans="subspans"`` (the method before issue 23, kept
  for the benchmark's before/after), every sub-span of up to 5 words
  (``candidate_spans``): cosine(question, span) + ``TYPE_BONUS`` if the span fits the
  question's expected answer type + ``NEAR_BONUS`` / (1 + words to the nearest question
  word) - ``LENGTH_PENALTY`` per word after the first. The candidate's score is the
  sentence score plus the span score. On the SQuAD subset's every-8th sample (dense, k 3)
  phrases with the lexical term lift EM/F1 from 0.133/0.229 to 0.183/0.312 and embed a
  third as many spans.
- ``GenerativeAnswerer(generator, tier)``: one ``Generator`` request per agent with the
  passages as numbered context (``[1] ...``, ``numbered_context``); the ``[n]`` the answer
  writes are its citations (``citations``: all the context when it cites none), taken out
  of the answer text; its score is the mean token log-probability turned into a
  probability (exp), in [0, 1].
- ``arbitrate(method, question, candidates, cache)``: ``"vote"`` (most frequent normalised
  answer; ties to the higher summed score), ``"best"`` (highest score) or ``"judge"`` (a judge
  agent embeds "question answer" and scores it against the candidate's evidence, so answers
  from different tiers are compared on one scale).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from sluice.rag.answer_type import expected_type, fits_type
from sluice.rag.config import EXTRACTIVE
from sluice.rag.corpus import Passage
from sluice.rag.embedder import Embedder
from sluice.rag.generation import Generator, GenerationRequest
from sluice.rag.text import (candidate_phrases, candidate_spans, content_terms, normalize_answer,
                             sentence_words, sentences)

RANK_PENALTY = 0.02
LEXICAL_WEIGHT = 0.6
PHRASE_WORDS = 8
SPAN_METHODS = ("phrases", "subspans")
TYPE_BONUS = 0.4
NEAR_BONUS = 0.3
LENGTH_PENALTY = 0.06
_LEAD_INS = re.compile(r"^(?:(?:can|could|would) you (?:please )?(?:tell me|explain)|please|"
                       r"i (?:want|would like|need) to know|tell me|do you know)[\s,:]+",
                       re.IGNORECASE)


@dataclass
class Meter:
    """Tokens processed per tier: ``{tier: [prompt_tokens, completion_tokens]}``."""

    tokens: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))

    def add(self, tier: str, prompt_tokens: int, completion_tokens: int = 0) -> None:
        self.tokens[tier][0] += prompt_tokens
        self.tokens[tier][1] += completion_tokens


@dataclass(frozen=True)
class Candidate:
    text: str
    passage_id: str
    score: float
    tier: str
    evidence: str
    cited: tuple[str, ...] = ()  # passages the answer used, ``passage_id`` first


_CITATION = re.compile(r"\[(\d+)\]")


def numbered_context(passages: Sequence[Passage]) -> str:
    """The passages as ``[1] text`` lines, so a generative answer can cite them by number."""
    return "\n".join(f"[{i}] {p.text}" for i, p in enumerate(passages, start=1))


def citations(text: str, passages: Sequence[Passage]) -> tuple[str, ...]:
    """Ids of the passages ``text`` cites as ``[n]``, in order; all of them when it cites
    none it was given (the answer then rests on the whole context)."""
    cited = [passages[int(n) - 1].id for n in _CITATION.findall(text)
             if 1 <= int(n) <= len(passages)]
    return tuple(dict.fromkeys(cited)) or tuple(p.id for p in passages)


def rewrite_query(question: str) -> str:
    text = " ".join(question.split())
    while True:
        stripped = _LEAD_INS.sub("", text)
        if stripped == text or not stripped:
            return text
        text = stripped[0].upper() + stripped[1:]


class EmbeddingCache:
    def __init__(self, embedder: Embedder, meter: Meter,
                 known: Mapping[str, np.ndarray] | None = None):
        self.embedder, self.meter = embedder, meter
        self._vectors: dict[str, np.ndarray] = dict(known or {})

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        new = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        if new:
            self.meter.add(EXTRACTIVE, sum(len(ids) for ids in self.embedder.tokenize(new)))
            for text, vector in zip(new, self.embedder.embed(new)):
                self._vectors[text] = vector
        if not texts:
            return np.zeros((0, self.embedder.dim), np.float32)
        return np.stack([self._vectors[t] for t in texts])


def rerank(question: str, passages: Sequence[Passage], cache: EmbeddingCache) -> list[Passage]:
    groups = [sentences(p.text) for p in passages]
    vectors = cache.embed([question] + [s for group in groups for s in group])
    q, rest = vectors[0], vectors[1:]
    scores, start = [], 0
    for group in groups:
        scores.append(float((rest[start:start + len(group)] @ q).max()))
        start += len(group)
    order = sorted(range(len(passages)), key=lambda i: (-scores[i], i))
    return [passages[i] for i in order]


class ExtractiveAnswerer:
    def __init__(self, spans: str = "phrases", lexical_weight: float = LEXICAL_WEIGHT,
                 max_span_words: int = 5):
        if spans not in SPAN_METHODS:
            raise ValueError(f"spans: unknown {spans!r} (expected one of "
                             f"{', '.join(SPAN_METHODS)})")
        self.spans, self.lexical_weight = spans, lexical_weight
        self.max_span_words = max_span_words

    def answer(self, question: str, passages: Sequence[Passage], agents: int,
               cache: EmbeddingCache) -> list[Candidate]:
        ranked = [(rank, p.id, s) for rank, p in enumerate(passages) for s in sentences(p.text)]
        vectors = cache.embed([question] + [s for _, _, s in ranked])
        q = vectors[0]
        scores = vectors[1:] @ q - RANK_PENALTY * np.array([r for r, _, _ in ranked])
        if self.lexical_weight:
            terms = content_terms(question)
            scores = scores + self.lexical_weight * np.array(
                [len(content_terms(s) & terms) / max(1, len(terms)) for _, _, s in ranked])
        order = np.argsort(-scores, kind="stable")
        out = []
        for agent in range(agents):
            i = int(order[agent % len(order)])
            _, pid, sentence = ranked[i]
            text, span_score = self._best_span(question, sentence, q, cache)
            out.append(Candidate(text, pid, float(scores[i]) + span_score, EXTRACTIVE, sentence,
                                 (pid,)))
        return out

    def _best_span(self, question: str, sentence: str, q: np.ndarray,
                   cache: EmbeddingCache) -> tuple[str, float]:
        if self.spans == "subspans":
            spans = candidate_spans(sentence, question, self.max_span_words)
        else:
            spans = candidate_phrases(sentence, question, PHRASE_WORDS)
        if not spans:
            return sentence, 0.0
        terms = content_terms(question)
        words = sentence_words(sentence)
        anchors = [i for i, w in enumerate(words) if content_terms(w) & terms]
        kind = expected_type(question)
        similarity = cache.embed([s.text for s in spans]) @ q
        best, best_score = sentence, -np.inf
        for span, sim in zip(spans, similarity):
            n = len(span.text.split())
            near = min((abs(a - span.start) if a < span.start else abs(a - span.start - n + 1)
                        for a in anchors), default=len(words))
            score = (float(sim) + TYPE_BONUS * fits_type(span.text, kind, span.start == 0)
                     + NEAR_BONUS / (1 + near) - LENGTH_PENALTY * (n - 1))
            if score > best_score:
                best, best_score = span.text, score
        return best, best_score


class GenerativeAnswerer:
    def __init__(self, generator: Generator, tier: str):
        self.generator, self.tier = generator, tier

    async def answer(self, question: str, passages: Sequence[Passage], agent_ids: Sequence[int],
                     max_tokens: int, meter: Meter) -> list[Candidate]:
        context = numbered_context(passages)
        requests = [GenerationRequest(context, question, max_tokens, seed=i) for i in agent_ids]
        out = []
        for gen in await self.generator.generate(requests):
            meter.add(self.tier, gen.prompt_tokens, gen.completion_tokens)
            cited = citations(gen.text, passages)
            answer = " ".join(_CITATION.sub(" ", gen.text).split())
            out.append(Candidate(answer, cited[0], float(np.exp(gen.mean_logprob)),
                                 self.tier, context, cited))
        return out


def arbitrate(method: str, question: str, candidates: Sequence[Candidate],
              cache: EmbeddingCache) -> Candidate:
    if not candidates:
        raise ValueError("candidates: no answerer produced an answer")
    if len(candidates) == 1:
        return candidates[0]
    if method == "best":
        return max(candidates, key=lambda c: c.score)
    if method == "vote":
        groups: dict[str, list[Candidate]] = defaultdict(list)
        for c in candidates:
            groups[normalize_answer(c.text)].append(c)
        winner = max(groups.values(), key=lambda g: (len(g), sum(c.score for c in g)))
        return max(winner, key=lambda c: c.score)
    if method == "judge":
        statements = [f"{question} {c.text}" for c in candidates]
        vectors = cache.embed(statements + [c.evidence for c in candidates])
        n = len(candidates)
        support = (vectors[:n] * vectors[n:]).sum(axis=1)
        return candidates[int(np.argmax(support))]
    raise ValueError(f"arbitration: unknown {method!r}")
