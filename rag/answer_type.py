"""Expected answer type from the question's wh-phrase, and whether a span fits it.

``expected_type(question)`` is ``"number"`` (how many/much, what percentage, how
long/old/large, ...), ``"date"`` (when, what year/century/decade), ``"person"`` (who, whom,
whose), ``"place"`` (where) or ``"other"``. ``fits_type(span, kind, sentence_start)`` says
whether a candidate span looks like that type: a digit or number word, a year/month/century,
a capitalised word that does not merely open the sentence. The extractive answerer adds a
bonus to spans that fit, because embedding similarity alone ranks a span that restates the
topic above the short fact the question asks for.
"""

from __future__ import annotations

import re

NUMBER_WORDS = frozenset("""zero one two three four five six seven eight nine ten eleven twelve
twenty thirty forty fifty hundred thousand million billion trillion dozen half""".split())
MONTHS = frozenset("""january february march april may june july august september october
november december""".split())
_NUMBER_Q = re.compile(r"\bhow (many|much|long|old|large|big|far|high|tall|often|fast)\b|"
                       r"\bwhat (percentage|percent|number|amount|size)\b")
_DATE_Q = re.compile(r"^when\b|\bwhen\b|\b(what|which) (year|century|decade|date|month|day|"
                     r"period|time)\b|\bin what year\b")
_PERSON_Q = re.compile(r"\bwho(m|se)?\b")
_PLACE_Q = re.compile(r"\bwhere\b|\b(what|which) (country|city|region|state|place|area|"
                      r"river|location)\b")
_DIGIT = re.compile(r"\d")
_CENTURY = re.compile(r"\b\d+(st|nd|rd|th)\b|\bcentur", re.IGNORECASE)


def expected_type(question: str) -> str:
    q = question.lower()
    if _NUMBER_Q.search(q):
        return "number"
    if _DATE_Q.search(q):
        return "date"
    if _PERSON_Q.search(q):
        return "person"
    if _PLACE_Q.search(q):
        return "place"
    return "other"


def fits_type(span: str, kind: str, sentence_start: bool) -> bool:
    words = span.split()
    lower = [w.strip(".,;:()'\"").lower() for w in words]
    if kind == "number":
        return bool(_DIGIT.search(span)) or any(w in NUMBER_WORDS for w in lower)
    if kind == "date":
        return bool(_DIGIT.search(span) or _CENTURY.search(span)) or any(w in MONTHS
                                                                         for w in lower)
    if kind in ("person", "place"):
        capitals = [w for i, w in enumerate(words)
                    if w[:1].isupper() and not (i == 0 and sentence_start)]
        return bool(capitals) and not _DIGIT.search(span)
    return False
