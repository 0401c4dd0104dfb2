"""Dense retrieval: exact inner-product search over unit-norm passage embeddings in numpy.

``DenseRetriever.build(corpus, embedder)`` embeds every passage once; ``search(question, k)``
/ ``search_many(questions, k)`` embed the questions with the same ``Embedder`` and rank
passages by inner product, which is cosine similarity because both sides are L2-normalised.
A brute-force float32 matrix product is exact and takes well under a millisecond per query
at the corpus sizes this layer targets (hundreds to tens of thousands of passages), so no
approximate vector index is needed yet.

``save(directory)`` writes ``embeddings.npy`` and ``dense.json`` (passage ids and the
embedder's weights fingerprint); ``load(directory, embedder)`` refuses an embedder whose
fingerprint differs, since query vectors from another model would not be comparable.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sluice.rag.corpus import Corpus
from sluice.rag.embedder import Embedder
from sluice.rag.retrieval import CorpusRetriever, Hit

EMBEDDINGS_FILE = "embeddings.npy"
META_FILE = "dense.json"


class DenseRetriever(CorpusRetriever):
    def __init__(self, embedder: Embedder, passage_ids: Sequence[str], embeddings: np.ndarray):
        if embeddings.shape != (len(passage_ids), embedder.dim):
            raise ValueError(f"embeddings: shape {embeddings.shape} does not match "
                             f"{len(passage_ids)} passages x dim {embedder.dim}")
        self.embedder = embedder
        self._ids = list(passage_ids)
        self.embeddings = embeddings.astype(np.float32, copy=False)

    @classmethod
    def build(cls, corpus: Corpus, embedder: Embedder,
              progress: str | None = None) -> DenseRetriever:
        return cls(embedder, corpus.ids(), embedder.embed(corpus.texts(), progress))

    def _rank(self, queries: list[str], k: int) -> list[list[Hit]]:
        scores = self.embedder.embed(queries) @ self.embeddings.T
        results = []
        for row in scores:
            top = np.argpartition(-row, k - 1)[:k]
            top = top[np.lexsort((top, -row[top]))]  # by score, ties by corpus order
            results.append([Hit(self._ids[i], float(row[i])) for i in top])
        return results

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / EMBEDDINGS_FILE, self.embeddings)
        meta = {"passage_ids": self._ids, "fingerprint": self.embedder.fingerprint}
        (directory / META_FILE).write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: str | Path, embedder: Embedder) -> DenseRetriever:
        directory = Path(directory)
        meta_path = directory / META_FILE
        try:
            meta = json.loads(meta_path.read_text())
            embeddings = np.load(directory / EMBEDDINGS_FILE)
        except (OSError, ValueError) as e:
            raise ValueError(f"{directory}: cannot read the dense index ({e})") from e
        if meta.get("fingerprint") != embedder.fingerprint:
            raise ValueError(f"{meta_path}: embeddings were made by a different model "
                             f"(fingerprint {str(meta.get('fingerprint'))[:12]}..., "
                             f"embedder {embedder.fingerprint[:12]}...)")
        return cls(embedder, meta["passage_ids"], embeddings)
