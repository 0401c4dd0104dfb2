"""The on-disk retrieval index: a corpus with its BM25 index and passage embeddings.

``RetrievalIndex.build(corpus, embedder)`` makes both retrievers; ``save(directory)`` writes

    directory/manifest.json   format version, passage count, embedder fingerprint
    directory/corpus/         passages.jsonl, questions.jsonl (``Corpus.save``)
    directory/bm25/           the bm25s index (``BM25Retriever.save``)
    directory/dense/          embeddings.npy, dense.json (``DenseRetriever.save``)
    directory/sentences/      sentences.json, vectors.npy: every passage sentence's embedding

and ``RetrievalIndex.load(directory, embedder)`` restores it without re-embedding or
re-tokenizing the corpus (embedding is the expensive step: seconds per hundred passages on
CPU). The sentence vectors are what the reranker and the extractive answerer compare a
question with; embedding them once here instead of in every query leaves a query one
question embedding plus its answer spans (``sentence_vectors``, keyed by sentence text).
``build(..., progress=True)`` shows a progress bar per embedding pass. ``retriever(name)`` returns ``"bm25"``, ``"dense"`` or ``"hybrid"`` (RRF of the two),
the retriever knob the RAG planner turns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sluice.rag.bm25 import BM25Retriever
from sluice.rag.corpus import Corpus
from sluice.rag.dense import DenseRetriever
from sluice.rag.embedder import Embedder
from sluice.rag.hybrid import HybridRetriever
from sluice.rag.retrieval import Retriever
from sluice.rag.text import sentences

FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
RETRIEVERS = ("bm25", "dense", "hybrid")


@dataclass(frozen=True)
class RetrievalIndex:
    corpus: Corpus
    bm25: BM25Retriever
    dense: DenseRetriever
    sentence_vectors: dict[str, np.ndarray] = field(default_factory=dict, compare=False)

    @classmethod
    def build(cls, corpus: Corpus, embedder: Embedder, progress: bool = False) -> RetrievalIndex:
        dense = DenseRetriever.build(corpus, embedder, "embedding passages" if progress else None)
        sentences = passage_sentences(corpus)
        vectors = embedder.embed(sentences, "embedding sentences" if progress else None)
        return cls(corpus, BM25Retriever.build(corpus), dense, dict(zip(sentences, vectors)))

    def retriever(self, name: str) -> Retriever:
        if name == "bm25":
            return self.bm25
        if name == "dense":
            return self.dense
        if name == "hybrid":
            return HybridRetriever([self.bm25, self.dense])
        raise ValueError(f"retriever: unknown {name!r} (expected one of {', '.join(RETRIEVERS)})")

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.corpus.save(directory / "corpus")
        self.bm25.save(directory / "bm25")
        self.dense.save(directory / "dense")
        (directory / "sentences").mkdir(exist_ok=True)
        (directory / "sentences" / "sentences.json").write_text(
            json.dumps(list(self.sentence_vectors)))
        np.save(directory / "sentences" / "vectors.npy",
                np.stack(list(self.sentence_vectors.values())) if self.sentence_vectors
                else np.zeros((0, self.dense.embedder.dim), np.float32))
        manifest = {"format_version": FORMAT_VERSION, "passages": len(self.corpus.passages),
                    "embedder_fingerprint": self.dense.embedder.fingerprint}
        (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))

    @classmethod
    def load(cls, directory: str | Path, embedder: Embedder) -> RetrievalIndex:
        directory = Path(directory)
        manifest_path = directory / MANIFEST_FILE
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{manifest_path}: cannot read the index manifest ({e})") from e
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{manifest_path}: format_version {manifest.get('format_version')!r}"
                             f" is not the supported {FORMAT_VERSION}")
        corpus = Corpus.load(directory / "corpus")
        try:
            sentences = json.loads((directory / "sentences" / "sentences.json").read_text())
            vectors = np.load(directory / "sentences" / "vectors.npy")
        except (OSError, ValueError) as e:
            raise ValueError(f"{directory / 'sentences'}: cannot read the sentence vectors "
                             f"({e})") from e
        index = cls(corpus, BM25Retriever.load(directory / "bm25"),
                    DenseRetriever.load(directory / "dense", embedder),
                    dict(zip(sentences, vectors)))
        if manifest.get("passages") != len(corpus.passages):
            raise ValueError(f"{manifest_path}: passages {manifest.get('passages')} but the "
                             f"corpus holds {len(corpus.passages)}")
        return index


def passage_sentences(corpus: Corpus) -> list[str]:
    """Every distinct sentence of the corpus's passages (``sluice.rag.text.sentences``)."""
    return list(dict.fromkeys(s for p in corpus.passages for s in sentences(p.text)))
