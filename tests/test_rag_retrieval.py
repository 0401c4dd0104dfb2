"""Retrieval foundation of the RAG layer: ingestion, index persistence, the JAX embedder's
parity with `transformers`, recall floors on SQuAD 2.0 (bench/data), RRF and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from sluice.rag.bm25 import BM25Retriever
from sluice.rag.corpus import (Chunking, Corpus, LabelledQuestion, Passage, load_documents,
                               load_jsonl, load_squad, load_text_files)
from sluice.rag.dense import DenseRetriever
from sluice.rag.embedder import Embedder, default_model_dir
from sluice.rag.hybrid import HybridRetriever, reciprocal_rank_fusion
from sluice.rag.index import RetrievalIndex
from sluice.rag.retrieval import Hit, evaluate

SQUAD = Path(__file__).resolve().parent.parent / "bench" / "data" / "squad2-dev-subset.json"


@pytest.fixture(scope="module")
def squad() -> Corpus:
    return load_squad(SQUAD)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.load()


@pytest.fixture(scope="module")
def index(squad: Corpus, embedder: Embedder) -> RetrievalIndex:
    return RetrievalIndex.build(squad, embedder)


@pytest.fixture(scope="module")
def sample(squad: Corpus) -> list[LabelledQuestion]:
    """A fixed half of the answerable questions: every other one in id order (237)."""
    return sorted(squad.answerable(), key=lambda q: q.id)[::2]


# --- ingestion -----------------------------------------------------------------------------

def test_text_and_jsonl_ingestion_gives_stable_ids(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("First paragraph.\nStill first.\n\n  \nSecond paragraph.\n")
    (docs / "b.md").write_text("Only one.")
    (docs / "skip.bin").write_bytes(b"\xff\xfe")
    corpus = load_documents(docs, Chunking(words=4, overlap=0))
    assert corpus.ids() == ["a.txt:0", "a.txt:1", "b.md:0"]
    assert corpus.passages[0] == Passage("a.txt:0", "First paragraph.\nStill first.", "a")
    assert load_documents(docs, Chunking(words=4, overlap=0)) == corpus
    # At the default size both short paragraphs of a.txt pack into one passage.
    assert load_documents(docs).ids() == ["a.txt:0", "b.md:0"]

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"id": "x", "text": " alpha ", "title": "T"}) + "\n\n"
                    + json.dumps({"text": "beta"}) + "\n")
    assert load_jsonl(rows).passages == (Passage("x", "alpha", "T"),
                                         Passage("rows.jsonl:3", "beta", ""))


def test_squad_ingestion_labels_questions_with_their_passages(squad: Corpus) -> None:
    # Counts from the data set's README: 126 paragraphs, 950 questions, 473 answerable.
    assert (len(squad.passages), len(squad.questions), len(squad.answerable())) == (126, 950, 473)
    assert squad.passages[0].id == "Normans:0"
    texts = dict(zip(squad.ids(), squad.texts()))
    for q in squad.answerable():
        assert q.answers and all(a in texts[q.passage_id] for a in q.answers), q.id
    assert all(not q.answers for q in squad.questions if not q.answerable)


def test_index_round_trip(tmp_path: Path, index: RetrievalIndex, embedder: Embedder,
                          sample: list[LabelledQuestion]) -> None:
    index.save(tmp_path / "idx")
    loaded = RetrievalIndex.load(tmp_path / "idx", embedder)
    assert loaded.corpus == index.corpus
    np.testing.assert_array_equal(loaded.dense.embeddings, index.dense.embeddings)
    questions = [q.question for q in sample[:20]]
    for name in ("bm25", "dense", "hybrid"):
        assert (loaded.retriever(name).search_many(questions, 5)
                == index.retriever(name).search_many(questions, 5)), name


# --- embedder ------------------------------------------------------------------------------

def test_embedder_matches_transformers(embedder: Embedder, squad: Corpus) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model_dir = str(default_model_dir())
    # Short and long texts: the longest passage exceeds 256 tokens and is truncated.
    texts = ["In what country is Normandy located?", "hi", max(squad.texts(), key=len),
             *squad.texts()[:5]]
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    assert batch["input_ids"].shape[1] == 256
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    reference = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    ours = embedder.embed(texts)
    assert ours.shape == (len(texts), 384)
    cosine_distance = 1.0 - (ours * reference.numpy()).sum(-1)
    assert cosine_distance.max() < 1e-4, cosine_distance


def test_embedding_does_not_depend_on_batch_or_padding(embedder: Embedder,
                                                       squad: Corpus) -> None:
    texts = squad.texts()[:3] + ["a short question?"]
    together = embedder.embed(texts)
    alone = np.stack([embedder.embed([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


# --- recall floors -------------------------------------------------------------------------

# Measured on this sample (237 questions) with bm25s 0.3.16 + PyStemmer, all-MiniLM-L6-v2:
#   bm25   recall@1 0.802  @5 0.962  @10 0.987
#   dense  recall@1 0.755  @5 0.941  @10 0.975
#   hybrid recall@1 0.819  @5 0.975  @10 0.992
# The floors sit 0.02-0.03 below those, to allow library drift without hiding a regression.
FLOORS = {"bm25": {1: 0.78, 5: 0.94, 10: 0.96},
          "dense": {1: 0.73, 5: 0.92, 10: 0.95},
          "hybrid": {1: 0.79, 5: 0.95, 10: 0.97}}


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_recall_floor(name: str, index: RetrievalIndex, sample: list[LabelledQuestion]) -> None:
    metrics = evaluate(index.retriever(name), sample, ks=(1, 5, 10))
    for k, floor in FLOORS[name].items():
        assert metrics[f"recall@{k}"] >= floor, (name, metrics)


# --- fusion --------------------------------------------------------------------------------

def test_reciprocal_rank_fusion_ordering() -> None:
    lexical = [Hit("a", 9.0), Hit("b", 5.0), Hit("c", 1.0)]
    semantic = [Hit("c", 0.9), Hit("b", 0.8), Hit("d", 0.7)]
    fused = reciprocal_rank_fusion([lexical, semantic], c=0)
    # c = 0: c = 1/3 + 1, a = 1, b = 1/2 + 1/2, d = 1/3; a and b tie at 1.0 and a wins
    # on its better best rank (1 vs 2).
    assert [h.passage_id for h in fused] == ["c", "a", "b", "d"]
    assert [h.score for h in fused] == pytest.approx([4 / 3, 1.0, 1.0, 1 / 3])
    # With the default c = 60 (c: 1/61 + 1/63, b: 2/62, a: 1/61), being ranked by both
    # retrievers beats a single first place.
    assert [h.passage_id for h in reciprocal_rank_fusion([lexical, semantic])] == [
        "c", "b", "a", "d"]


def test_hybrid_retriever_fuses_and_truncates(index: RetrievalIndex) -> None:
    question = "In what country is Normandy located?"
    hybrid = HybridRetriever([index.bm25, index.dense], depth=10)
    expected = reciprocal_rank_fusion([index.bm25.search(question, 10),
                                       index.dense.search(question, 10)])[:3]
    assert hybrid.search(question, 3) == expected


# --- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bm25", "dense", "hybrid"])
@pytest.mark.parametrize("question", ["", "   "])
def test_empty_question_is_rejected(name: str, question: str, index: RetrievalIndex) -> None:
    with pytest.raises(ValueError, match="question"):
        index.retriever(name).search(question, 5)


def test_bad_k_and_unknown_retriever(index: RetrievalIndex) -> None:
    with pytest.raises(ValueError, match="k:"):
        index.bm25.search("Normandy", 0)
    with pytest.raises(ValueError, match="retriever: unknown 'colbert'"):
        index.retriever("colbert")


def test_empty_corpus_is_rejected(tmp_path: Path, embedder: Embedder) -> None:
    with pytest.raises(ValueError, match="passages"):
        Corpus(())
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=f"passages: {empty}"):
        load_jsonl(empty)
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n ")
    with pytest.raises(ValueError, match=f"passages: {blank} has no text"):
        load_text_files([blank])
    no_docs = tmp_path / "no_docs"
    no_docs.mkdir()
    with pytest.raises(ValueError, match=f"passages: no .* files in {no_docs}"):
        load_documents(no_docs)
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"data": []}))
    with pytest.raises(ValueError, match="passages"):
        load_squad(squad)


def test_unreadable_or_malformed_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    with pytest.raises(ValueError, match=f"{missing}: cannot read"):
        load_documents(missing)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match=f"{binary}: cannot read"):
        load_text_files([binary])
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match=f"{rows}:2: field 'text'"):
        load_jsonl(rows)
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [{"qas": []}]}]}))
    with pytest.raises(ValueError, match=r"data\[0\]\.paragraphs\[0\]: field 'context'"):
        load_squad(squad)
    with pytest.raises(ValueError, match="unsupported suffix"):
        load_documents(tmp_path / "table.csv")


def test_index_load_rejects_other_embeddings(tmp_path: Path, embedder: Embedder,
                                             squad: Corpus) -> None:
    small = Corpus(squad.passages[:3])
    dense = DenseRetriever(embedder, small.ids(), np.zeros((3, embedder.dim), np.float32))
    dense.save(tmp_path)
    meta = json.loads((tmp_path / "dense.json").read_text())
    meta["fingerprint"] = "0" * 64
    (tmp_path / "dense.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="different model"):
        DenseRetriever.load(tmp_path, embedder)
    with pytest.raises(ValueError, match="bm25.json"):
        BM25Retriever.load(tmp_path)
