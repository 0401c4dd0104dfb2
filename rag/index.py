"""The on-disk retrieval index: a corpus with its BM25 index and passage embeddings.

``RetrievalIndex.build(corpus, embedder)`` makes both retrievers; ``save(directory)`` writes

    directory/manifest.json   format version, passage count, embedder fingerprint
    directory/corpus/         passages.jsonl, questions.jsonl (``Corpus.save``)
    directory/bm25/           the bm25s index (``BM25Retriever.save``)
    directory/dense/          embeddings.npy, dense.json (``DenseRetriever.save``)

and ``RetrievalIndex.load(directory, embedder)`` restores it without re-embedding or
re-tokenizing the corpus (embedding is the expensive step: seconds per hundred passages on
CPU). ``retriever(name)`` returns ``"bm25"``, ``"dense"`` or ``"hybrid"`` (RRF of the two),
the retriever knob the RAG planner turns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sluice.rag.bm25 import BM25Retriever
from sluice.rag.corpus import Corpus
from sluice.rag.dense import DenseRetriever
from sluice.rag.embedder import Embedder
from sluice.rag.hybrid import HybridRetriever
from sluice.rag.retrieval import Retriever

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
RETRIEVERS = ("bm25", "dense", "hybrid")


@dataclass(frozen=True)
class RetrievalIndex:
    corpus: Corpus
    bm25: BM25Retriever
    dense: DenseRetriever

    @classmethod
    def build(cls, corpus: Corpus, embedder: Embedder) -> RetrievalIndex:
        return cls(corpus, BM25Retriever.build(corpus), DenseRetriever.build(corpus, embedder))

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
        index = cls(corpus, BM25Retriever.load(directory / "bm25"),
                    DenseRetriever.load(directory / "dense", embedder))
        if manifest.get("passages") != len(corpus.passages):
            raise ValueError(f"{manifest_path}: passages {manifest.get('passages')} but the "
                             f"corpus holds {len(corpus.passages)}")
        return index
