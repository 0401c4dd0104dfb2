"""Questions generated from the passages themselves, for profiling a corpus without labels.

Method (template cloze-to-question, no model needed): from a passage, take a sentence that
holds a factual span: a number or year, or a run of capitalised words that does not merely
open the sentence. The span is the answer; the question is the words around it (at most
``CONTEXT_WORDS`` on each side, inside the sentence) with the span replaced by a
wh-phrase ("what year" for a year, "how many" for another number, "what" otherwise) and a
question mark: "Rollo founded Normandy in 911." -> "Rollo founded Normandy in what year?".

People reword what they ask: a SQuAD question carries 3.5 content words of its answer's
sentence (of its 6.4 ``sluice.rag.text.content_terms``), a question keeping its whole
clause 5.4 (of 6.8). So each content word of the clause is kept with probability
``KEEP_CONTENT`` (decided by a hash of the passage, the sentence and the word's position:
deterministic), stop words always, which leaves 3.1: "In 1967, Manuel Blum developed an
axiomatic complexity theory based on his axioms ..." -> "In what year Manuel an axiomatic
complexity theory based?". 0.56 is the share of a SQuAD question's content words found in
the sentence (0.55 by the same count); the count carried would give 0.64, an untested
rate. Echo questions made retrieval trivial (every retriever found the sentence, so k and
the retriever hardly mattered) and their F1 was twice real questions'; with words dropped,
the mean F1 over the default configurations is close to the labelled one (0.33 vs 0.31) and
the ranking agrees better (Spearman's rho with the labelled ranking of the 27 default
configurations 0.58 -> 0.70). All of these are `bench/rag.py --documents-run` figures;
``bench/RESULTS.md`` gives the runs and their noise.

The source passage and the span are the label, so a configuration's quality is the same
token F1 as on labelled data, against the span (``sluice.rag.text.f1``), and its retrieval
is judged against the passage.

``generate_questions(corpus, n)`` takes passages spread evenly over the corpus in id order
(deterministic) and one question from each (its first sentence with a span, numbers
preferred, as SQuAD's answers often are), passages with none skipped; when ``n`` is more
than that gives, a second question from each (its next such sentence), and so on. Question
ids are ``generated:<passage id>:<sentence index>``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator

from sluice.rag.corpus import Corpus, LabelledQuestion, Passage
from sluice.rag.text import STOP_WORDS, sentence_words, sentences

CONTEXT_WORDS = 8
KEEP_CONTENT = 0.56
METHOD = "generated"
_YEAR = re.compile(r"^(1[0-9]{3}|20[0-9]{2})$")
_NUMBER = re.compile(r"^\d[\d,.]*%?$")
_EDGE = ".,;:!?()[]\"'"


def _clean(word: str) -> str:
    return word.strip(_EDGE)


def _spans(words: list[str]) -> list[tuple[int, int, str]]:
    """(start, end exclusive, wh-phrase) of candidate answers, numbers first."""
    numbers, names = [], []
    i = 0
    while i < len(words):
        w = _clean(words[i])
        if _NUMBER.match(w):
            numbers.append((i, i + 1, "what year" if _YEAR.match(w) else "how many"))
            i += 1
            continue
        if i > 0 and w[:1].isupper() and w.lower() not in STOP_WORDS:
            j = i + 1
            while (j < len(words) and _clean(words[j])[:1].isupper()
                   and not words[j].startswith("(")
                   and not words[j - 1].endswith((",", ";", ":", ".", ")"))):
                j += 1
            names.append((i, j, "what"))
            i = j
            continue
        i += 1
    return numbers + names


def _kept(word: str, where: str, keep: float) -> bool:
    """Whether the clause keeps ``word``: stop words always, content words with
    probability ``keep``, by a hash of ``word`` and ``where`` (its place)."""
    key = _clean(word).lower()
    if not key or key in STOP_WORDS:
        return True
    digest = hashlib.sha256(f"{where}|{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") < keep * 2 ** 32


def question_from(sentence: str, where: str,
                  keep: float = KEEP_CONTENT) -> tuple[str, str] | None:
    """(question, answer span) from one sentence, or None when it has no usable span;
    ``where`` names the sentence (its passage and index), seeding which words stay;
    ``keep``: the chance a content word stays (1: the echo question)."""
    words = sentence_words(sentence)
    if len(words) < 6:
        return None
    for start, end, wh in _spans(words):
        before = words[max(0, start - CONTEXT_WORDS):start]
        after = words[end:end + CONTEXT_WORDS]
        answer = " ".join(words[start:end]).strip(_EDGE)
        if not answer or len(before) + len(after) < 4:
            continue
        kept = ([w for i, w in enumerate(before) if _kept(w, f"{where}|b{i}", keep)] + [wh]
                + [w for i, w in enumerate(after) if _kept(w, f"{where}|a{i}", keep)])
        text = " ".join(kept).rstrip(_EDGE + " ")
        return text[0].upper() + text[1:] + "?", answer
    return None


def passage_questions(passage: Passage,
                      keep: float = KEEP_CONTENT) -> Iterator[LabelledQuestion]:
    """A question from each of the passage's sentences that has a span, in order."""
    for i, sentence in enumerate(sentences(passage.text)):
        made = question_from(sentence, f"{passage.id}|{i}", keep)
        if made:
            question, answer = made
            yield LabelledQuestion(f"{METHOD}:{passage.id}:{i}", question, passage.id,
                                   (answer,), True)


def generate_questions(corpus: Corpus, n: int,
                       keep: float = KEEP_CONTENT) -> list[LabelledQuestion]:
    if n < 1:
        raise ValueError(f"--profile-questions: must be >= 1, got {n}")
    passages = sorted(corpus.passages, key=lambda p: p.id)
    step = max(1, len(passages) // n)
    order = passages[::step] + [p for i, p in enumerate(passages) if i % step]
    streams = [passage_questions(p, keep) for p in order]  # generators: nothing made yet
    out: list[LabelledQuestion] = []
    while streams and len(out) < n:  # a round: the next question of each passage
        alive = []
        for stream in streams:
            q = next(stream, None)
            if q is not None:
                out.append(q)
                alive.append(stream)
                if len(out) == n:
                    break
        streams = alive
    if not out:
        raise ValueError("documents: no sentence with a number or a name to ask about, so "
                         "no question could be generated to profile the configurations")
    return out
