"""``sluice rag build-index``: ingest documents, build the retrieval index, measure profiles.

    sluice rag build-index --documents bench/data/squad2-dev-subset.json --out rag-index \\
        [--profile-questions 40] [--model tiny]

writes the ``RetrievalIndex`` to ``--out``, then, when the corpus has labelled answerable
questions, measures every ``default_configs`` configuration on the first
``--profile-questions`` of them (sorted by id) and writes ``profiles.json`` plus the default
``classes.json`` (edit it to change the SLOs). With ``--model`` the generative
configurations of that model are profiled too, through an offline ``LLM``; the tier is named
after the model, which must match the name the server serves it under. ``sluice serve
--rag-index DIR`` then mounts ``POST /v1/rag/query``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sluice.rag.config import EXTRACTIVE
from sluice.rag.corpus import load_documents
from sluice.rag.cost import MINILM, CostModel, ModelTier, spec_from_config
from sluice.rag.embedder import Embedder
from sluice.rag.generation import LLMGenerator
from sluice.rag.index import RetrievalIndex
from sluice.rag.pipeline import RagPipeline
from sluice.rag.profiling import default_configs, measure_all
from sluice.rag.service import CLASSES_FILE, DEFAULT_CLASSES, PROFILES_FILE, save_classes
from sluice.rag.sla import save_profiles


def configure(rag: argparse.ArgumentParser) -> None:
    """Adds the ``rag`` subcommands to its parser (``sluice`` names it in its table)."""
    rag_sub = rag.add_subparsers(dest="rag", required=True)
    b = rag_sub.add_parser("build-index", help="index documents and profile configurations")
    b.add_argument("--documents", required=True,
                   help="a .txt/.md file or directory, a .jsonl file or SQuAD .json")
    b.add_argument("--out", required=True, help="index directory to write")
    b.add_argument("--profile-questions", type=int, default=40,
                   help="labelled questions each configuration is profiled on (default: 40)")
    b.add_argument("--model", default=None,
                   help="also profile generative configurations of this model (e.g. tiny)")


def run(args: argparse.Namespace) -> int:
    if args.profile_questions < 1:
        raise ValueError(f"profile_questions: must be >= 1, got {args.profile_questions}")
    corpus = load_documents(args.documents)
    embedder = Embedder.load()
    index = RetrievalIndex.build(corpus, embedder)
    out = Path(args.out)
    index.save(out)
    print(f"sluice: indexed {len(corpus.passages)} passages into {out}")
    questions = sorted(corpus.answerable(), key=lambda q: q.id)[:args.profile_questions]
    if not questions:
        print("sluice: no labelled questions: profiles not measured; the RAG route needs "
              f"{PROFILES_FILE} (build from a labelled corpus such as SQuAD JSON)")
        return 0
    tiers = {EXTRACTIVE: ModelTier(EXTRACTIVE, MINILM)}
    generators = {}
    if args.model:
        from sluice.runtime.llm import LLM
        llm = LLM(args.model, warmup=False)
        tiers[args.model] = ModelTier(args.model, spec_from_config(args.model, llm.model.config))
        generators[args.model] = LLMGenerator(llm)
    pipeline = RagPipeline(index, CostModel(tiers), generators)
    measurements = measure_all(pipeline, default_configs(list(generators)), questions)
    save_profiles(out / PROFILES_FILE, [m.profile for m in measurements])
    if not (out / CLASSES_FILE).exists():
        save_classes(out / CLASSES_FILE, DEFAULT_CLASSES)
    for m in measurements:
        p = m.profile
        print(json.dumps({"config": p.config.name, "f1": round(p.quality, 3),
                          "latency_p95_s": round(p.latency_p95_s, 4), "cost_usd": p.cost_usd}))
    return 0
