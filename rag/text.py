"""Text utilities of the RAG layer: SQuAD-style answer scoring, sentences and answer spans.

- ``normalize_answer(text)``: the SQuAD evaluation normalisation (lower case, punctuation and
  the articles a/an/the removed, whitespace collapsed), so "The Normans." equals "normans".
- ``exact_match(prediction, answers)`` / ``f1(prediction, answers)``: the SQuAD metrics, the
  best over the gold answers; token F1 is over normalised whitespace tokens. An unanswerable
  question (no gold answers) scores 1 only for an empty prediction, as in SQuAD 2.0.
- ``split_sentences(text)``: sentences on ``.``/``!``/``?`` followed by white space and an
  upper-case letter, digit or quote, which keeps "U.S." and "c. 1000" inside one sentence;
  ``sentences(text)`` falls back to the whole text when there is no boundary.
- ``content_terms(text)``: lower-cased word stems (first ``STEM_CHARS`` characters) without
  stop words; the extractive answerer uses them to find where the question's words occur.
- ``candidate_spans(sentence, question, max_len)``: short spans of a sentence that could answer
  the question: runs of words between the question's own words and punctuation, edges
  trimmed of stop words, every sub-span up to ``max_len`` words. An answer rarely repeats the
  question's words, and SQuAD answers are short (median 2-3 words), so this keeps the
  candidate set small enough to embed each one.
- ``candidate_phrases(sentence, question, max_len)``: whole phrases instead (the pieces of
  runs between prepositions, auxiliaries and pronouns), what the extractive answerer scores
  by default: an answer comes back whole ("time and memory"), not as its most topical word
  ("memory").
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

STEM_CHARS = 5
STOP_WORDS = frozenset("""
a an the of in on at to for from by with about as into onto upon over under than then and or
but nor so yet is are was were be been being am do does did has have had having it its this
that these those there here what which who whom whose when where why how whatever whichever
i me my we our you your he him his she her they them their not no also can could would should
may might must will shall one ones s
""".split())
PHRASE_BREAKS = STOP_WORDS - {"of", "and", "the", "a", "an", "s"}
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(A-Z0-9])")
_WORD = re.compile(r"\S+")
_BREAK_AFTER = (",", ";", ":", ")", '"')
_BREAK_BEFORE = ("(", '"')
_EDGE = "".join(sorted(_PUNCT - {"%", "$", "-"}))


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    if not answers:
        return float(not normalize_answer(prediction))
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(a) for a in answers))


def f1(prediction: str, answers: Sequence[str]) -> float:
    if not answers:
        return float(not normalize_answer(prediction))
    return max(_token_f1(normalize_answer(prediction).split(), normalize_answer(a).split())
               for a in answers)


def _token_f1(pred: list[str], gold: list[str]) -> float:
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def sentences(text: str) -> list[str]:
    """``split_sentences(text)``, or the whole text when it has no sentence boundary."""
    return split_sentences(text) or [text.strip()]


def _word_key(word: str) -> str:
    return word.strip(string.punctuation).lower()[:STEM_CHARS]


def content_terms(text: str) -> set[str]:
    keys = (_word_key(w) for w in _WORD.findall(text))
    return {k for k in keys if k and k not in STOP_WORDS}


@dataclass(frozen=True)
class Span:
    """A candidate answer: its text and the index of its first word in the sentence."""

    text: str
    start: int


def sentence_words(sentence: str) -> list[str]:
    return _WORD.findall(sentence)


def _runs(sentence: str, question: str) -> tuple[list[str], list[list[int]]]:
    """The sentence's words and its runs: word indices between the question's own words and
    punctuation breaks."""
    question_terms = content_terms(question)
    words = sentence_words(sentence)
    runs: list[list[int]] = [[]]
    for i, word in enumerate(words):
        key = _word_key(word)
        if key in question_terms or word.startswith(_BREAK_BEFORE):
            runs.append([])
        if key not in question_terms and word.strip(_EDGE):
            runs[-1].append(i)
        if word.endswith(_BREAK_AFTER) or word.endswith((".", "?", "!")):
            runs.append([])
    return words, [r for r in runs if r]


def candidate_spans(sentence: str, question: str, max_len: int = 5) -> list[Span]:
    words, runs = _runs(sentence, question)
    spans: dict[str, Span] = {}
    for run in runs:
        for a in range(len(run)):
            for b in range(a, min(a + max_len, len(run))):
                first, last = words[run[a]], words[run[b]]
                if _word_key(first) in STOP_WORDS or _word_key(last) in STOP_WORDS:
                    continue
                text = " ".join(words[run[a]:run[b] + 1]).strip(_EDGE)
                if text and text not in spans:
                    spans[text] = Span(text, run[a])
    return list(spans.values())


def _trim(words: list[str], piece: list[int]) -> list[int]:
    while piece and _word_key(words[piece[0]]) in STOP_WORDS:
        piece = piece[1:]
    while piece and _word_key(words[piece[-1]]) in STOP_WORDS:
        piece = piece[:-1]
    return piece


def candidate_phrases(sentence: str, question: str, max_len: int = 8) -> list[Span]:
    """Whole phrases of a sentence that could answer the question: the pieces of each run
    (words between the question's own words and punctuation) between its ``PHRASE_BREAKS``
    (prepositions, auxiliaries, pronouns: not "of"/"and", which hold names and lists
    together: "University of Chicago", "time and memory"), trimmed of stop words at their
    edges, at most ``max_len`` words each. Far fewer candidates than every sub-span
    (``candidate_spans``), and each one a complete phrase rather than a fragment of it."""
    words, runs = _runs(sentence, question)
    spans: dict[str, Span] = {}
    for run in runs:
        pieces, current = [], []
        for i in run:
            if _word_key(words[i]) in PHRASE_BREAKS:
                pieces.append(current)
                current = []
            else:
                current.append(i)
        pieces.append(current)
        for piece in pieces:
            piece = _trim(words, piece)
            if not piece or piece[-1] - piece[0] + 1 > max_len:
                continue
            text = " ".join(words[piece[0]:piece[-1] + 1]).strip(_EDGE)
            if text and text not in spans:
                spans[text] = Span(text, piece[0])
    return list(spans.values())
