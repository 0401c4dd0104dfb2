"""``sluice rag build-index``: ingest documents, build the retrieval index, measure profiles.

    sluice rag build-index --documents DOCS --out rag-index \\
        [--chunk-words 180] [--chunk-overlap 30] [--profile-questions 30] [--model tiny] \\
        [--no-progress]

``DOCS`` is a folder (searched recursively for .txt, .md, .html, .pdf, .jsonl and SQuAD .json
files) or one such file. Writes the ``RetrievalIndex``, ``profiles.json`` (every
``default_configs`` configuration measured on ``--profile-questions`` questions: the
corpus's labelled ones, or for plain documents questions generated from the passages) and
``classes.json`` (SLOs derived from the measured profiles; edit it to change them) to
``--out``: all ``sluice serve --rag-index DIR`` needs to mount ``POST /v1/rag/query``. The
build shows progress bars, writes each profile as soon as it is measured and, re-run on
the same ``--out``, reuses the index and skips the configurations already measured
(`sluice.rag.build`). With ``--model`` the generative configurations of that model are
profiled too, through an offline ``LLM``; the tier is named after the model, which must
match the name the server serves it under.
"""

from __future__ import annotations

import argparse
import json

from sluice.rag.build import DEFAULT_PROFILE_QUESTIONS, build_index
from sluice.rag.corpus import DEFAULT_CHUNK_OVERLAP, DEFAULT_CHUNK_WORDS, Chunking
from sluice.rag.cost import ModelTier, spec_from_config
from sluice.rag.generation import LLMGenerator


def configure(rag: argparse.ArgumentParser) -> None:
    """Adds the ``rag`` subcommands to its parser (``sluice`` names it in its table)."""
    rag_sub = rag.add_subparsers(dest="rag", required=True)
    b = rag_sub.add_parser("build-index", help="index documents and profile configurations")
    b.add_argument("--documents", required=True,
                   help="a folder of .txt/.md/.html/.pdf/.jsonl/SQuAD .json files, or one file")
    b.add_argument("--out", required=True, help="index directory to write (re-run to resume)")
    b.add_argument("--chunk-words", type=int, default=DEFAULT_CHUNK_WORDS,
                   help=f"most words per passage (default: {DEFAULT_CHUNK_WORDS})")
    b.add_argument("--chunk-overlap", type=int, default=DEFAULT_CHUNK_OVERLAP,
                   help="words shared by consecutive windows of a long paragraph "
                        f"(default: {DEFAULT_CHUNK_OVERLAP})")
    b.add_argument("--profile-questions", type=int, default=DEFAULT_PROFILE_QUESTIONS,
                   help="questions each configuration is profiled on "
                        f"(default: {DEFAULT_PROFILE_QUESTIONS})")
    b.add_argument("--model", default=None,
                   help="also profile generative configurations of this model (e.g. tiny)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    if args.profile_questions < 1:
        raise ValueError(f"--profile-questions: must be >= 1, got {args.profile_questions}")
    chunking = Chunking(args.chunk_words, args.chunk_overlap)
    tiers, generators = {}, {}
    if args.model:
        from sluice.runtime.llm import LLM
        llm = LLM(args.model, warmup=False)
        tiers[args.model] = ModelTier(args.model, spec_from_config(args.model, llm.model.config))
        generators[args.model] = LLMGenerator(llm)
    report = build_index(args.documents, args.out, chunking=chunking,
                         profile_questions=args.profile_questions, tiers=tiers,
                         generators=generators, progress=not args.no_progress)
    print(json.dumps({"build": report.to_dict()}))
    return 0
