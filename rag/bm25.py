"""BM25 lexical retrieval on the maintained ``bm25s`` library (with PyStemmer stemming).

``BM25Retriever.build(corpus)`` tokenizes every passage (lower case, English stop words
removed, Snowball English stems: on the SQuAD subset stemming lifts recall@1 from 0.75 to
0.78) and builds a Lucene-variant BM25 index (k1 1.5, b 0.75). ``search(question, k)`` /
``search_many(questions, k)`` return ``Hit``s best first; passages sharing no term with the
question score 0 and are left out, so a question with no known term gets no hits.
``save(directory)`` writes the bm25s index (its own sparse-matrix files and vocabulary) plus
``bm25.json`` with the passage ids and tokenizer settings; ``load(directory)`` restores it
without re-tokenizing the corpus, and queries are tokenized with the saved settings so the
vocabulary always matches.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import bm25s
import numpy as np
import Stemmer

from sluice.rag.corpus import Corpus
from sluice.rag.retrieval import CorpusRetriever, Hit

# bm25s sets its logger to DEBUG, so any root handler (the CLI's, the server's) printed
# "DEBUG:bm25s:Building index from tokens" on every build.
logging.getLogger("bm25s").setLevel(logging.WARNING)

STOPWORDS = "en"
STEMMER_LANGUAGE = "english"
META_FILE = "bm25.json"


class BM25Retriever(CorpusRetriever):
    def __init__(self, model: bm25s.BM25, passage_ids: Sequence[str]):
        self._model = model
        self._ids = list(passage_ids)
        self._stemmer = Stemmer.Stemmer(STEMMER_LANGUAGE)

    @classmethod
    def build(cls, corpus: Corpus) -> BM25Retriever:
        retriever = cls(bm25s.BM25(), corpus.ids())
        retriever._model.index(retriever._tokenize(corpus.texts()), show_progress=False)
        return retriever

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        return bm25s.tokenize(texts, stopwords=STOPWORDS, stemmer=self._stemmer,
                              return_ids=False, show_progress=False)

    def _rank(self, queries: list[str], k: int) -> list[list[Hit]]:
        docs, scores = self._model.retrieve(self._tokenize(queries), k=k, show_progress=False)
        return [[Hit(self._ids[d], float(s)) for d, s in zip(row_d, row_s) if s > 0]
                for row_d, row_s in zip(np.asarray(docs), np.asarray(scores))]

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self._model.save(str(directory), show_progress=False)
        meta = {"passage_ids": self._ids, "stopwords": STOPWORDS, "stemmer": STEMMER_LANGUAGE}
        (directory / META_FILE).write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: str | Path) -> BM25Retriever:
        directory = Path(directory)
        meta_path = directory / META_FILE
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{meta_path}: cannot read the BM25 index ({e})") from e
        if (meta.get("stopwords"), meta.get("stemmer")) != (STOPWORDS, STEMMER_LANGUAGE):
            raise ValueError(f"{meta_path}: built with tokenizer settings "
                             f"{meta.get('stopwords')!r}/{meta.get('stemmer')!r}, "
                             f"this version uses {STOPWORDS!r}/{STEMMER_LANGUAGE!r}")
        return cls(bm25s.BM25.load(str(directory), show_progress=False), meta["passage_ids"])
