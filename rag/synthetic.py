"""Questions generated from the passages themselves, for profiling a corpus without labels.

Method (template cloze-to-question, no model needed): from a passage, take a sentence that
holds a factual span: a number or year, or a run of capitalised words that does not merely
open the sentence. The span is the answer; the question is the words around it (at most
``CONTEXT_WORDS`` on each side, inside the sentence) with the span replaced by a
wh-phrase ("what year" for a year, "how many" for another number, "what" otherwise) and a
question mark: "Rollo founded Normandy in 911." -> "Rollo founded Normandy in what year?"
(the clause keeps the sentence's word order: an echo question).
The source passage and the span are the label, so a configuration's quality is the same
token F1 as on labelled data, against the span (``sluice.rag.text.f1``), and its retrieval
is judged against the passage. The generated questions echo their sentence's words more than
people's questions do, so absolute F1 runs higher than on real questions; what the planner
needs is the ORDER of configurations, and ``bench/rag.py`` checks that this estimate ranks
the configurations as real SQuAD labels do (Spearman's rho on the same passages).

``generate_questions(corpus, n)`` picks ``n`` passages spread evenly over the corpus in id
order (deterministic) and one question from each (the passage's first sentence with a
span, numbers preferred, as SQuAD's answers often are); passages with no such sentence are
skipped for the next ones. Question ids are ``generated:<passage id>``.
"""

from __future__ import annotations

import re

from sluice.rag.corpus import Corpus, LabelledQuestion, Passage
from sluice.rag.text import STOP_WORDS, sentence_words, sentences

CONTEXT_WORDS = 8
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


def question_from(sentence: str) -> tuple[str, str] | None:
    """(question, answer span) from one sentence, or None when it has no usable span."""
    words = sentence_words(sentence)
    if len(words) < 6:
        return None
    for start, end, wh in _spans(words):
        before = words[max(0, start - CONTEXT_WORDS):start]
        after = words[end:end + CONTEXT_WORDS]
        answer = " ".join(words[start:end]).strip(_EDGE)
        if not answer or len(before) + len(after) < 4:
            continue
        text = " ".join(before + [wh] + after).rstrip(_EDGE + " ")
        return text[0].upper() + text[1:] + "?", answer
    return None


def passage_question(passage: Passage) -> LabelledQuestion | None:
    for sentence in sentences(passage.text):
        made = question_from(sentence)
        if made:
            question, answer = made
            return LabelledQuestion(f"{METHOD}:{passage.id}", question, passage.id, (answer,),
                                    True)
    return None


def generate_questions(corpus: Corpus, n: int) -> list[LabelledQuestion]:
    if n < 1:
        raise ValueError(f"--profile-questions: must be >= 1, got {n}")
    passages = sorted(corpus.passages, key=lambda p: p.id)
    step = max(1, len(passages) // n)
    order = passages[::step] + [p for i, p in enumerate(passages) if i % step]
    out = []
    for passage in order:
        q = passage_question(passage)
        if q is not None:
            out.append(q)
            if len(out) == n:
                break
    if not out:
        raise ValueError("documents: no sentence with a number or a name to ask about, so "
                         "no question could be generated to profile the configurations")
    return out
