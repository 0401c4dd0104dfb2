"""What ``sluice rag build-index`` does: documents in, everything ``sluice serve --rag-index``
needs out, resumable.

``build_index(documents, out, ...)``:

1. ``load_documents(documents, chunking)`` (``sluice.rag.corpus``);
2. the retrieval index: reused from ``out`` when it holds the same passages made by the same
   embedder (a re-run does not re-embed), else built (progress bars per embedding pass) and
   saved;
3. the profiling questions: ``profile_questions`` of the corpus's labelled answerable
   questions (SQuAD JSON) spread evenly in id order, quality method ``"labelled"``; for
   plain documents, as many questions generated from the passages
   (``sluice.rag.synthetic``), method ``"generated"``;
4. every configuration profiled (``measure_all``): each profile is written to
   ``profiles.json`` as soon as it is measured, a re-run over the same questions and index
   skips the configurations already there, and a clearly dominated one stops early;
5. ``classes.json``, when absent, with SLOs derived from the profiles (``derive_classes``);
   an existing one (an operator's edit) is kept and checked: a class whose SLO no
   configuration meets is reported (``BuildReport.unmet``), and the server will serve it
   best-effort.

``BuildReport`` says what was done: passages, questions and method, profiles (new and
reused), classes and unmet SLOs, seconds.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sluice.rag.config import EXTRACTIVE, PipelineConfig
from sluice.rag.corpus import Chunking, Corpus, LabelledQuestion, load_documents
from sluice.rag.cost import MINILM, CostModel, ModelTier
from sluice.rag.embedder import Embedder
from sluice.rag.generation import Generator
from sluice.rag.index import MANIFEST_FILE, RetrievalIndex
from sluice.rag.pipeline import RagPipeline
from sluice.rag.profiling import ProfileStore, default_configs, measure_all, sample_questions
from sluice.rag.service import (CLASSES_FILE, PROFILES_FILE, derive_classes, load_classes,
                                save_classes)
from sluice.rag.sla import Planner, Profile, QueryClass
from sluice.rag.synthetic import METHOD as GENERATED, generate_questions

DEFAULT_PROFILE_QUESTIONS = 30


@dataclass
class BuildReport:
    passages: int
    index_reused: bool
    questions: int
    quality_method: str
    profiles_measured: int
    profiles_reused: int
    classes: dict[str, dict]
    unmet: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def load_or_build_index(corpus: Corpus, embedder: Embedder, out: Path,
                        progress: bool) -> tuple[RetrievalIndex, bool]:
    """The index in ``out`` when it holds exactly ``corpus`` embedded by ``embedder``;
    otherwise a new one, saved there. Returns (index, whether it was reused)."""
    if (out / MANIFEST_FILE).exists():
        try:
            index = RetrievalIndex.load(out, embedder)
        except ValueError:
            index = None
        if index is not None and index.corpus.passages == corpus.passages:
            return index, True
    index = RetrievalIndex.build(corpus, embedder, progress)
    index.save(out)
    return index, False


def profiling_questions(corpus: Corpus, n: int) -> tuple[list[LabelledQuestion], str]:
    """(questions, quality method): labelled ones when the corpus has them, else generated."""
    if corpus.answerable():
        return sample_questions(corpus.answerable(), n), "labelled"
    return generate_questions(corpus, n), GENERATED


def digest(index: RetrievalIndex, questions: Sequence[LabelledQuestion]) -> str:
    """What a profile depends on besides its configuration: the passages, the embedder and
    the questions with their labels."""
    h = hashlib.sha256(index.dense.embedder.fingerprint.encode())
    for p in index.corpus.passages:
        h.update(json.dumps([p.id, p.text]).encode())
    for q in questions:
        h.update(json.dumps([q.id, q.question, q.passage_id, list(q.answers)]).encode())
    return h.hexdigest()


def check_classes(classes: dict[str, QueryClass], profiles: Sequence[Profile]) -> dict[str, str]:
    """Class -> why no profile meets its SLO, for the classes none meets."""
    planner, unmet = Planner(profiles), {}
    for name, cls in classes.items():
        try:
            planner.choose(cls.slo)
        except ValueError as e:
            unmet[name] = str(e)
    return unmet


def build_index(documents: str | Path, out: str | Path, *, chunking: Chunking = Chunking(),
                profile_questions: int = DEFAULT_PROFILE_QUESTIONS,
                tiers: dict[str, ModelTier] | None = None,
                generators: dict[str, Generator] | None = None,
                configs: Sequence[PipelineConfig] | None = None,
                embedder: Embedder | None = None, progress: bool = True,
                log: Callable[[str], None] = print) -> BuildReport:
    start = time.perf_counter()
    out = Path(out)
    corpus = load_documents(documents, chunking)
    questions, method = profiling_questions(corpus, profile_questions)
    embedder = Embedder.load() if embedder is None else embedder
    index, reused = load_or_build_index(corpus, embedder, out, progress)
    log(f"sluice: {'reused' if reused else 'indexed'} {len(corpus.passages)} passages in {out}")
    log(f"sluice: profiling on {len(questions)} {method} questions"
        + (" (generated from the passages: the source passage and span are the labels)"
           if method == GENERATED else ""))
    generators = dict(generators or {})
    cost = CostModel({EXTRACTIVE: ModelTier(EXTRACTIVE, MINILM), **(tiers or {})})
    pipeline = RagPipeline(index, cost, generators)
    store = ProfileStore(out, digest(index, questions), PROFILES_FILE)
    before = len(store.profiles)
    configs = default_configs(list(generators)) if configs is None else list(configs)
    measure_all(pipeline, configs, questions, store, method, progress)
    profiles = [p for p in store.profiles if p.config in configs]
    for p in profiles:
        log(json.dumps({"config": p.config.name, "f1": round(p.quality, 3),
                        "exact_match": round(p.exact_match or 0.0, 3),
                        "latency_p95_s": round(p.latency_p95_s, 4), "cost_usd": p.cost_usd,
                        "questions": p.questions, "stopped_early": p.stopped_early}))
    classes_path = out / CLASSES_FILE
    if classes_path.exists():
        classes = load_classes(classes_path)
    else:
        classes = derive_classes(profiles)
        save_classes(classes_path, classes)
    unmet = check_classes(classes, profiles)
    for name, why in unmet.items():
        log(f"sluice: WARNING class {name!r}: no configuration meets its SLO ({why}); "
            f"it will be served best-effort (edit {classes_path} to change it)")
    return BuildReport(len(corpus.passages), reused, len(questions), method,
                       len(store.profiles) - before, before,
                       {n: c.slo.to_dict() for n, c in classes.items()}, unmet,
                       time.perf_counter() - start)
