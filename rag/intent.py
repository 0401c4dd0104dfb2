"""Query classes from intent: rules first, then a nearest-centroid classifier on embeddings.

``IntentClassifier(embedder, seeds, rules)``: ``seeds`` maps each class to a few labelled
example questions; their embeddings are averaged into one unit-norm centroid per class, and
``classify(question)`` returns the class whose centroid has the highest cosine similarity
with the question's embedding, unless a rule matched first. ``rules`` are
``(regex, class)`` pairs tried in order on the lower-cased question: they pin intents whose
wording is unambiguous ("why ...", "compare ...") so a short seed set does not have to cover
them. A nearest-centroid model needs no training loop and stays explainable: the
similarities to every centroid come back from ``scores(question)``.

``DEFAULT_SEEDS`` / ``DEFAULT_RULES`` define two classes: ``lookup`` (a short fact: who,
when, where, how many, what is X called) and ``analytical`` (explanations, causes,
comparisons, consequences), the split between "fast and cheap" and "better answer, more
work" the SLA planner serves.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from sluice.rag.embedder import Embedder
from sluice.rag.retrieval import check_question

DEFAULT_SEEDS: dict[str, tuple[str, ...]] = {
    "lookup": (
        "Who was the first king of Norway?",
        "When was the treaty signed?",
        "Where is the university located?",
        "How many people live in the city?",
        "What year did the war end?",
        "What is the name of the river?",
        "Which company built the bridge?",
        "What is the capital of France?",
    ),
    "analytical": (
        "Why did the empire decline?",
        "How does the scheduling algorithm work?",
        "Explain the difference between the two theories.",
        "What were the consequences of the conquest for the local population?",
        "Compare the economies of the northern and southern regions.",
        "What factors led to the growth of the city?",
        "How did the reforms change the legal system?",
        "What is the significance of the complexity class P?",
    ),
}
DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    (r"^(why|explain|compare|describe|discuss|analy[sz]e)\b", "analytical"),
    (r"\b(what|which) (factors|reasons|consequences|effects|causes)\b", "analytical"),
    (r"^(who|when|where|how many|how much|in what year|what year)\b", "lookup"),
)


class IntentClassifier:
    def __init__(self, embedder: Embedder,
                 seeds: Mapping[str, Sequence[str]] = DEFAULT_SEEDS,
                 rules: Sequence[tuple[str, str]] = DEFAULT_RULES):
        empty = [c for c, examples in seeds.items() if not examples]
        if not seeds or empty:
            raise ValueError(f"seeds: every class needs at least one example question "
                             f"(none for {empty})")
        for pattern, cls in rules:
            if cls not in seeds:
                raise ValueError(f"rules: class {cls!r} of rule {pattern!r} has no seeds")
        self.embedder = embedder
        self.classes = list(seeds)
        centroids = np.stack([embedder.embed(list(seeds[c])).mean(axis=0) for c in self.classes])
        self.centroids = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
        self.rules = [(re.compile(p), c) for p, c in rules]

    def scores(self, question: str) -> dict[str, float]:
        vector = self.embedder.embed([check_question(question)])[0]
        return dict(zip(self.classes, (self.centroids @ vector).tolist()))

    def classify(self, question: str) -> str:
        text = check_question(question).lower()
        for pattern, cls in self.rules:
            if pattern.search(text):
                return cls
        scores = self.scores(question)
        return max(self.classes, key=lambda c: scores[c])
